"""The runs of document groups in a token file, in token order: what held-out splits by source read.

A token file records `"groups": [[group_name, first_token, end_token], ...]` in metadata.json: contiguous
runs of documents of one `megaolmo.data.groups.group_name`, end exclusive, counted in that file's tokens.
A shard of one source is one run; a mixed shard is as many runs as its group changes, so the record stays
small while still locating every document's group without reading the documents again.
"""

from __future__ import annotations


class GroupRuns:
    """Builds the runs as documents are appended to a token file."""

    def __init__(self) -> None:
        self.runs: list[list] = []
        self.end = 0

    def add(self, group: str, tokens: int) -> None:
        """Append one document of `group` taking `tokens` tokens (its EOS included)."""
        if self.runs and self.runs[-1][0] == group:
            self.runs[-1][2] += tokens
        else:
            self.runs.append([group, self.end, self.end + tokens])
        self.end += tokens
