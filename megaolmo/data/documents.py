"""The documents packed into each instance, read off its token ids, for intra-document attention.

OLMo's data ends every document with EOS and cuts the token stream into fixed-length instances, so an
instance holds the end of one document, whole documents and the start of the next. With
`data.document_masking=true` a token attends only to its own document, and the engine finds the
documents here, from the ids alone, so no data pipeline or caller has to supply them.

The boundaries are allenai/OLMo's `get_document_lengths` (olmo/data/util.py; OLMo-core's without a BOS
id): EOS is the last token of its document, and a tail after the last EOS is a document of its own that
ends at the instance's end. Row r of a batch covers (e_{k-1}, e_k] for its boundaries
e = [-1, EOS positions..., s - 1 when the last token is not EOS], so its lengths sum to s.

Positions restart at 0 in each document, as in OLMo-core since "Fixes the Qwen3 implementation to match
HF (#663)" (commit 60d2487ab, 2026-05-07), so a packed document is computed exactly as it would be alone.
allenai/OLMo, and OLMo-core before that commit, kept the instance's positions 0..s-1 instead.
"""

from __future__ import annotations

import torch


def document_lengths(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """[b, s] token ids -> [b, most documents in a row] int32 lengths, each row padded at the end with zeros.

    Row r holds OLMo's `get_document_lengths(input_ids[r], eos_token_id)`, and the zero padding is OLMo's
    collator's `doc_lens`, so the lengths of a batch split into micro-batches by rows, as its ids do. The
    whole batch is done in a few tensor ops, with no loop over rows or documents.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    ends = input_ids == eos_token_id
    ends[:, -1:] = True  # the last token ends a document, EOS or not
    rows, cols = ends.nonzero(as_tuple=True)  # every row's document ends, rows in order, each row's in order
    index = ends.cumsum(dim=1)[rows, cols] - 1  # which document of its row each end closes
    previous = torch.cat([cols.new_full((1,), -1), cols[:-1]]).masked_fill(index == 0, -1)
    n_docs = int(index.max()) + 1 if index.numel() else 0
    lengths = torch.zeros(input_ids.shape[0], n_docs, dtype=torch.int32, device=input_ids.device)
    lengths[rows, index] = (cols - previous).to(torch.int32)
    return lengths


def document_positions(doc_lens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """[b, s] int64: each token's position in its document (0 at a document's first token), from `doc_lens`
    ([b, n] per-row lengths summing to `seq_len`, zero-padded as `document_lengths` gives them).

    This is everything the model needs to know about the documents (a document starts where the position
    is 0), in a per-token tensor that splits into micro-batches like the ids and carries the full sequence
    length to every pipeline stage, sequence-parallel or not.
    """
    flat = doc_lens.flatten().to(torch.int64)  # row-major: the batch's documents in token order
    n_tokens = doc_lens.shape[0] * seq_len
    starts = flat.cumsum(0) - flat  # the first token of each document, as an index into the flattened batch
    # repeat_interleave skips the zero-length padding; output_size spares a device-to-host sync.
    token_starts = torch.repeat_interleave(starts, flat, output_size=n_tokens)
    return (torch.arange(n_tokens, device=doc_lens.device) - token_starts).view(doc_lens.shape[0], seq_len)
