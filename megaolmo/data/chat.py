"""Instruction (chat) data -> token memmaps and label masks for fine-tuning, in open-instruct's tulu format.

One example a line, either a conversation or a prompt and its response (one user and one assistant turn):

    {"messages": [{"role": "system" | "user" | "assistant", "content": "..."}, ...]}
    {"prompt": "...", "response": "..."}

Each example is rendered as text with open-instruct's tulu chat template (what OLMo-2's SFT used), the
tokenizer's EOS string `<|endoftext|>` closing every assistant turn:

    system     <|system|>\\n{content}\\n
    user       <|user|>\\n{content}\\n
    assistant  <|assistant|>\\n{content}<|endoftext|>     then \\n, unless it is the last message

so a prompt and response is `<|user|>\\n{prompt}\\n<|assistant|>\\n{response}<|endoftext|>`. The tokens
are the tokenization of that text (the template's EOS strings become the EOS id; a special-token string
inside a content stays text, as in `prepare`). Masked in (label mask True: the loss counts them) are the
tokens of every assistant turn's content and the EOS closing it; masked out are the role headers, the
system and user turns and the \\n after an assistant's EOS. That is open-instruct's mask (its
`sft_tulu_tokenize_and_truncate_v1`) but for one corner: there, the header of an assistant turn that
directly follows another assistant turn is trained on. A token belongs to a content when its first
character does (a token cannot cross an EOS, and the byte-level BPE pre-tokenizer splits at the header's
closing newline).

Conversations are packed like pretraining documents: back to back in the token file, each ending with
an EOS (its last assistant turn's; one that ends with another role gets an EOS that is masked out), and
instances are cut across them, as OLMo's fine-tuning memmaps are. The masks go to
`<out>/label_masks/<name>.npy` beside `<out>/<name>.npy`: one np.bool_ per token (OLMo's
label_mask_paths format), with the token files' names, so `data.label_mask_paths=[<out>/label_masks]`
pairs them with `data.paths=[<out>]` file by file.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

import numpy as np

from megaolmo.data.dolma import dolma_stem
from megaolmo.data.group_runs import GroupRuns
from megaolmo.data.jsonl import json_objects
from megaolmo.data.tokenizer import load_tokenizer
from megaolmo.errors import DataError

ROLES = ("system", "user", "assistant")
LABEL_MASK_DIR = "label_masks"  # where prepare --chat writes the masks, beside the token files
BATCH_CONVERSATIONS = 256  # conversations per encode_batch call


def label_mask_path(token_file: Path) -> Path:
    """Where the label mask of a prepared token file lives."""
    return token_file.parent / LABEL_MASK_DIR / token_file.name


@dataclass(frozen=True)
class Rendered:
    """A conversation as text pieces, each followed by an EOS token: the template's EOS strings split it."""

    pieces: list[str]
    targets: list[list[tuple[int, int]]]  # per piece, the [start, end) characters of the assistant contents
    eos_targets: list[bool]  # per piece, whether its EOS closes an assistant turn (a target)
    source: str


def _messages(record: dict, where: str) -> list[tuple[str, str]]:
    """(role, content) of every turn of one example, checked."""
    if "messages" not in record and isinstance(record.get("prompt"), str) and isinstance(record.get("response"), str):
        return [("user", record["prompt"]), ("assistant", record["response"])]
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise DataError(
            f'{where}: an example needs "messages" (a list of {{"role", "content"}}) or a string "prompt" and '
            '"response"'
        )
    turns = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        content = message.get("content") if isinstance(message, dict) else None
        if not isinstance(role, str) or not isinstance(content, str):
            raise DataError(f'{where}: message {i} needs a string "role" and a string "content"')
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; the roles are {', '.join(ROLES)}")
        turns.append((role, content))
    if all(role != "assistant" for role, _ in turns):
        raise DataError(f"{where}: the example has no assistant turn, so nothing to train on; drop it or add one")
    return turns


def render(turns: list[tuple[str, str]], source: str) -> Rendered:
    """The tulu template's text of a conversation, cut at its EOS tokens, with the assistant contents marked."""
    pieces: list[str] = []
    targets: list[list[tuple[int, int]]] = []
    text, spans = "", []
    for role, content in turns:
        if role != "assistant":
            text += f"<|{role}|>\n{content}\n"
            continue
        text += "<|assistant|>\n"
        spans.append((len(text), len(text) + len(content)))
        pieces.append(text + content)
        targets.append(spans)
        text, spans = "\n", []  # the newline after a turn that is not the last
    eos_targets = [True] * len(pieces)
    if turns[-1][0] != "assistant":
        pieces.append(text)
        targets.append(spans)
        eos_targets.append(False)
    return Rendered(pieces, targets, eos_targets, source)


def read_conversations(path: Path) -> Iterator[tuple[str, Rendered]]:
    """(file:line, rendered conversation) for every example of a chat JSONL file, in order."""
    for number, record in json_objects(path, DataError, "example"):
        where = f"{path}:{number}"
        source = record.get("source") if isinstance(record.get("source"), str) else dolma_stem(path)
        yield where, render(_messages(record, where), source)


def _utf8_bytes(conversation: Rendered, where: str) -> int:
    try:
        return sum(len(piece.encode("utf-8")) for piece in conversation.pieces)
    except UnicodeEncodeError:
        raise DataError(f"{where}: the example has text that is not valid Unicode (a lone surrogate)") from None


def tokenize_chat_file(
    src: Path, dst: Path, tokenizer_path: Path, dtype: str, eos: int, on_batch: Callable[[int, int], None] | None = None
) -> dict:
    """Tokenize one chat JSONL file into the memmap `dst` and its label mask; return its counts.

    The same signature and result as tokenize_shard.tokenize_file (plus the targets), so a process pool runs either.
    """
    tokenizer = load_tokenizer(tokenizer_path)
    tokenizer.encode_special_tokens = True  # special-token strings in a content are text (the EOS is added here)
    sources: dict[str, dict[str, int]] = {}
    groups = GroupRuns()  # a conversation's group is its source
    total_tokens = total_docs = total_targets = 0
    conversations = read_conversations(src)
    with open(dst, "wb") as out, open(label_mask_path(dst), "wb") as mask_out:
        while batch := list(islice(conversations, BATCH_CONVERSATIONS)):
            sizes = [_utf8_bytes(conversation, where) for where, conversation in batch]
            pieces = [piece for _, conversation in batch for piece in conversation.pieces]
            encodings = iter(tokenizer.encode_batch(pieces, add_special_tokens=False))
            ids: list[int] = []
            masks: list[np.ndarray] = []
            for (_, conversation), size in zip(batch, sizes):
                start = len(ids)
                for spans, eos_target in zip(conversation.targets, conversation.eos_targets):
                    encoding = next(encodings)
                    first_chars = np.array([offset[0] for offset in encoding.offsets], dtype=np.int64)
                    target = np.zeros(len(first_chars) + 1, dtype=np.bool_)
                    for begin, end in spans:
                        target[:-1] |= (first_chars >= begin) & (first_chars < end)
                    target[-1] = eos_target
                    ids.extend(encoding.ids)
                    ids.append(eos)
                    masks.append(target)
                stats = sources.setdefault(conversation.source, {"tokens": 0, "documents": 0, "bytes": 0})
                stats["tokens"] += len(ids) - start
                stats["documents"] += 1
                stats["bytes"] += size
                groups.add(conversation.source, len(ids) - start)
            mask = np.concatenate(masks)
            np.asarray(ids, dtype=dtype).tofile(out)
            mask.tofile(mask_out)
            total_tokens += len(ids)
            total_docs += len(batch)
            total_targets += int(mask.sum())
            if on_batch is not None:
                on_batch(len(batch), len(ids))
    return {
        "input": str(src),
        "tokens": total_tokens,
        "documents": total_docs,
        "targets": total_targets,
        "bytes": sum(s["bytes"] for s in sources.values()),
        "sources": dict(sorted(sources.items())),
        "groups": groups.runs,
    }
