"""Context parallelism: each sequence split over the CP group in load-balanced chunks, attention as a ring.

The split is Megatron's and torchtitan's zig-zag: a sequence of s tokens is cut into 2 x cp chunks of
c = s / (2 cp) tokens, and CP rank r holds chunks r and 2cp-1-r. Under causal attention a late chunk attends
to many keys and an early one to few, so pairing them gives every rank the same work. A rank's tokens, in
the order it holds them, are ascending positions of the sequence, so everything outside attention (norms,
linears, the loss) runs on them unchanged.

Attention is a ring over the CP group. Each rank keeps its queries; the keys and values (one [2, b, kv
heads, s / cp, hd] buffer) pass from rank to rank, the next block's transfer in flight while the current
block computes. Every (query chunk, key chunk) pair is one fused SDPA kernel call that also returns its
log-sum-exp, and the partial results merge in fp32 by their log-sum-exps. A pair is skipped where causality
or the sliding window masks it whole, and computed under an additive mask where documents or the window
mask part of it. The backward runs the same ring: keys and values circulate again, and their gradients
(fp32) travel with them and end on the rank that holds them.

torch's own context parallelism (`torch.distributed.tensor.experimental.context_parallel`) patches SDPA for
DTensor inputs and supports causal attention without a mask; megaolmo's blocks need document masks and
sliding windows inside the ring, so the ring is written here, next to the TP mappings, on the same kernels
(torch's fused CPU flash kernel; CUDA's memory-efficient kernel, which takes an additive mask).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

aten = torch.ops.aten


@dataclass(frozen=True)
class ContextParallel:
    """A stage's CP group (set by parallelize): its size, this rank's place in the ring, and how many times
    sequence parallelism splits the rank's tokens again over TP (1 without SP)."""

    group: ProcessGroup
    size: int
    rank: int
    sequence_split: int = 1

    @property
    def next_rank(self) -> int:
        """The global rank the ring passes keys and values to."""
        return dist.get_global_rank(self.group, (self.rank + 1) % self.size)

    @property
    def previous_rank(self) -> int:
        """The global rank the ring receives keys and values from."""
        return dist.get_global_rank(self.group, (self.rank - 1) % self.size)


def chunks_of(rank: int, cp: int) -> tuple[int, int]:
    """The two chunks (of 2 x cp) that CP rank `rank` holds, in order."""
    return rank, 2 * cp - 1 - rank


def zigzag_index(seq_len: int, cp: int, rank: int, device: torch.device | None = None) -> torch.Tensor:
    """[s / cp] int64: the positions in the whole sequence of CP rank `rank`'s tokens, in the order it holds them."""
    chunk = seq_len // (2 * cp)
    return torch.cat([torch.arange(i * chunk, (i + 1) * chunk, device=device) for i in chunks_of(rank, cp)])


def zigzag_split(tensor: torch.Tensor, cp: int, rank: int, dim: int = 1) -> torch.Tensor:
    """This CP rank's tokens of `tensor` along `dim` (the sequence): chunks r and 2cp-1-r, one after the other."""
    parts = tensor.chunk(2 * cp, dim=dim)
    return torch.cat([parts[i] for i in chunks_of(rank, cp)], dim=dim)


def rope_rows(
    cache: dict[int, tuple[torch.Tensor, ...]], positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows of RoPE's [s, hd / 2] tables at `positions` (any shape), gathered once per table into `cache`
    (here and in megaolmo.model.olmo.Documents). Keyed by the table's id: blocks share rope_tables' cached
    tables, and YaRN's are others; the entry holds the tables too, so their ids stay theirs."""
    if id(cos) not in cache:
        cache[id(cos)] = (cos, sin, cos[positions], sin[positions])
    _, _, cos_rows, sin_rows = cache[id(cos)]
    return cos_rows, sin_rows


class SequenceShard:
    """This CP rank's tokens of a micro-batch, in the forms RoPE and the ring take them (built once per stage
    forward, like megaolmo.model.olmo.Documents).

    `doc_positions` [b, s] is each token's position in its document over the whole sequence (every CP rank has
    it: it is the engine's stage keyword argument with document masking); None attends causally over the whole
    sequence. RoPE rotates each local token by its position in its document, or in the sequence.
    """

    def __init__(
        self, cp: ContextParallel, local_len: int, device: torch.device, doc_positions: torch.Tensor | None = None
    ) -> None:
        self.cp = cp
        self.chunk = local_len // 2
        self.seq_len = local_len * cp.size
        self.index = zigzag_index(self.seq_len, cp.size, cp.rank, device)
        self.document: torch.Tensor | None = None  # [b, s]: which document of its row each token is in
        self.positions = self.index  # [s / cp], or [b, s / cp] with documents
        if doc_positions is not None:
            self.document = (doc_positions == 0).cumsum(dim=1)
            self.positions = doc_positions[:, self.index]
        self._rows: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def rope(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of [s, hd / 2] tables for this rank's tokens: [s / cp, hd / 2], or [s / cp, b, hd / 2] with
        documents (each rotated from its document's start). Gathered once per table."""
        positions = self.positions.t() if self.positions.dim() == 2 else self.positions
        return rope_rows(self._rows, positions, cos, sin)


@dataclass(frozen=True)
class BlockPair:
    """One kernel call of a ring step: query chunk `q` (0 or 1, of this rank's two) against the keys of chunk
    `k` (0 or 1, of the two the current buffer holds), a chunk against itself (`diagonal`) or an earlier one,
    under a mask (documents, or a window that cuts it) or none."""

    q: int
    k: int
    diagonal: bool
    masked: bool

    @property
    def causal(self) -> bool:
        """The kernel's own causal mask: a chunk against itself, where no mask (which includes it) is given."""
        return self.diagonal and not self.masked


def ring_pairs(cp: int, rank: int, source: int, chunk: int, window: int | None, documents: bool) -> list[BlockPair]:
    """The pairs CP rank `rank` computes in the ring step holding the keys of CP rank `source` (chunks of
    `chunk` tokens): those causality and the window leave something of, a chunk against itself first (it gives
    every query a key, so merges start from a finite log-sum-exp). Pure arithmetic: the planner counts the
    ring's work with it too (megaolmo.plan.timing)."""
    pairs = []
    for qi, q_chunk in enumerate(chunks_of(rank, cp)):
        for ki, k_chunk in enumerate(chunks_of(source, cp)):
            if k_chunk > q_chunk:
                continue  # every key after every query
            nearest = q_chunk * chunk - (k_chunk * chunk + chunk - 1)  # the least distance from a query to a key
            farthest = q_chunk * chunk + chunk - 1 - k_chunk * chunk
            if window is not None and nearest >= window:
                continue  # every key outside the window
            masked = documents or (window is not None and farthest >= window)
            pairs.append(BlockPair(qi, ki, diagonal=k_chunk == q_chunk, masked=masked))
    return sorted(pairs, key=lambda pair: not pair.diagonal)


def _pairs(shard: SequenceShard, source: int, window: int | None) -> list[BlockPair]:
    """The pairs this rank computes with the keys of CP rank `source` (`ring_pairs`)."""
    cp = shard.cp
    return ring_pairs(cp.size, cp.rank, source, shard.chunk, window, documents=shard.document is not None)


def _allowed(shard: SequenceShard, pair: BlockPair, source: int, window: int | None) -> torch.Tensor:
    """[b or 1, 1, c, c] bool: where a query of the pair may attend a key (causal, in the window, same document)."""
    c, cp = shard.chunk, shard.cp.size
    q_start = chunks_of(shard.cp.rank, cp)[pair.q] * c
    k_start = chunks_of(source, cp)[pair.k] * c
    device = shard.index.device
    q_pos = torch.arange(q_start, q_start + c, device=device)[:, None]
    k_pos = torch.arange(k_start, k_start + c, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    allowed = allowed[None, None]
    if shard.document is not None:
        q_doc = shard.document[:, q_start : q_start + c]
        k_doc = shard.document[:, k_start : k_start + c]
        allowed = allowed & (q_doc[:, None, :, None] == k_doc[:, None, None, :])
    return allowed


def _bias(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The additive mask the fused kernels take: 0 where allowed, -inf elsewhere. CUDA's memory-efficient
    kernel reads it in rows aligned to 16 elements, so there it is cut from a padded allocation."""
    cols = allowed.shape[-1]
    padded = -(-cols // 16) * 16 if allowed.is_cuda else cols
    bias = torch.zeros(*allowed.shape[:-1], padded, dtype=dtype, device=allowed.device)[..., :cols]
    return bias.masked_fill_(~allowed, float("-inf"))


def _expand_heads(q: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """k or v [b, kv heads, n, hd] repeated to q's heads (CUDA's memory-efficient kernel takes no GQA)."""
    groups = q.shape[1] // kv.shape[1]
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)


def _block_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention output [b, h, nq, hd], its log-sum-exp [b, h, nq] fp32) of one pair, with scale 1/sqrt(hd)."""
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, attn_mask=bias)
    out, lse, _, _ = aten._scaled_dot_product_efficient_attention(
        q, _expand_heads(q, k), _expand_heads(q, v), bias, True, 0.0, causal
    )
    return out, lse[..., : q.shape[2]]


def _block_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one pair given the merged output and log-sum-exp: with those, each pair's softmax is its
    exact share of the whole row's, so the pairs' gradients sum to the full attention's."""
    if q.device.type == "cpu":
        return aten._scaled_dot_product_flash_attention_for_cpu_backward(
            grad_out, q, k, v, out, lse, 0.0, causal, attn_mask=bias
        )
    no_seed = torch.empty((), dtype=torch.int64, device=q.device)  # dropout 0: the RNG state is not read
    dq, dk, dv, _ = aten._scaled_dot_product_efficient_attention_backward(
        grad_out, q, _expand_heads(q, k), _expand_heads(q, v), bias, out, lse, no_seed, no_seed, 0.0,
        [True, True, True, False], causal,
    )  # fmt: skip
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        dk, dv = (g.unflatten(1, (k.shape[1], groups)).sum(2) for g in (dk, dv))
    return dq, dk, dv


def _exchange(send: torch.Tensor, cp: ContextParallel) -> tuple[torch.Tensor, list]:
    """Send `send` to the next rank of the ring and receive the previous rank's into a new buffer (in flight)."""
    received = torch.empty_like(send)
    works = dist.batch_isend_irecv(
        [
            dist.P2POp(dist.isend, send, cp.next_rank, cp.group),
            dist.P2POp(dist.irecv, received, cp.previous_rank, cp.group),
        ]
    )
    return received, works


def _wait(works: list) -> None:
    for work in works:
        work.wait()


class _RingAttention(torch.autograd.Function):
    """Causal attention of this rank's queries over the whole sequence's keys, passed around the CP ring."""

    @staticmethod
    def forward(ctx, q, k, v, shard: SequenceShard, window: int | None):
        b, h, n, hd = q.shape
        c, cp = shard.chunk, shard.cp
        exact = torch.promote_types(q.dtype, torch.float32)  # the merge's dtype: fp32, or fp64 for fp64 inputs
        out_sums = [torch.zeros(b, h, c, hd, dtype=exact, device=q.device) for _ in range(2)]
        lses: list[torch.Tensor | None] = [None, None]
        kv = torch.stack([k, v])
        for step in range(cp.size):
            source = (cp.rank - step) % cp.size
            if step < cp.size - 1:
                next_kv, works = _exchange(kv, cp)
            for pair in _pairs(shard, source, window):
                allowed = _allowed(shard, pair, source, window) if pair.masked else None
                bias = None if allowed is None else _bias(allowed, q.dtype)
                rows, keys = slice(pair.q * c, (pair.q + 1) * c), slice(pair.k * c, (pair.k + 1) * c)
                out, lse = _block_forward(q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], pair.causal, bias)
                out, lse = out.to(exact), lse.to(exact)
                if allowed is not None:  # a query with no key here: no weight in the merge
                    visible = allowed.any(-1).expand(b, h, c)
                    lse = lse.masked_fill(~visible, float("-inf"))
                    out = out.masked_fill(~visible[..., None], 0.0)
                if lses[pair.q] is None:
                    out_sums[pair.q], lses[pair.q] = out, lse
                    continue
                merged = torch.logaddexp(lses[pair.q], lse)
                out_sums[pair.q] = (
                    out_sums[pair.q] * (lses[pair.q] - merged).exp()[..., None] + out * (lse - merged).exp()[..., None]
                )
                lses[pair.q] = merged
            if step < cp.size - 1:
                _wait(works)
                kv = next_kv
        # The output in [n, b, h, hd] storage, as one process's SDPA writes it on CPU: the block's reshape into
        # attn_out's input is then a view.
        result = torch.empty(n, b, h, hd, dtype=q.dtype, device=q.device).permute(1, 2, 0, 3)
        for i in range(2):
            result[:, :, i * c : (i + 1) * c] = out_sums[i]
        lse = torch.cat(lses, dim=-1)
        ctx.save_for_backward(q, k, v, result, lse)
        ctx.shard, ctx.window = shard, window
        return result

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse = ctx.saved_tensors
        shard, window = ctx.shard, ctx.window
        c, cp = shard.chunk, shard.cp
        exact = lse.dtype
        dq = torch.zeros(q.shape, dtype=exact, device=q.device)
        kv = torch.stack([k, v])
        dkv_received, dkv_works = None, []  # the gradients of the keys held next, from the previous rank
        for step in range(cp.size):
            source = (cp.rank - step) % cp.size
            if step < cp.size - 1:
                next_kv, kv_works = _exchange(kv, cp)
            dkv = torch.zeros(kv.shape, dtype=exact, device=kv.device)  # this step's, for `source`'s keys
            for pair in _pairs(shard, source, window):
                bias = _bias(_allowed(shard, pair, source, window), q.dtype) if pair.masked else None
                rows, keys = slice(pair.q * c, (pair.q + 1) * c), slice(pair.k * c, (pair.k + 1) * c)
                dq_pair, dk_pair, dv_pair = _block_backward(
                    grad_out[:, :, rows], q[:, :, rows], kv[0][:, :, keys], kv[1][:, :, keys], out[:, :, rows],
                    lse[:, :, rows].contiguous(), pair.causal, bias,
                )  # fmt: skip
                dq[:, :, rows] += dq_pair
                dkv[0][:, :, keys] += dk_pair
                dkv[1][:, :, keys] += dv_pair
            if step > 0:  # what the ranks before added to `source`'s keys, travelling with them
                _wait(dkv_works)
                dkv += dkv_received
            dkv_received, dkv_works = _exchange(dkv, cp)
            if step < cp.size - 1:
                _wait(kv_works)
                kv = next_kv
        _wait(dkv_works)  # the last hop brings each rank its own keys' gradients, summed over the ring
        return dq.to(q.dtype), dkv_received[0].to(k.dtype), dkv_received[1].to(v.dtype), None, None


def ring_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shard: SequenceShard, window: int | None = None
) -> torch.Tensor:
    """Causal attention of this CP rank's queries [b, heads, s / cp, hd] over the whole sequence's keys and
    values [b, kv heads, s / cp, hd] (each rank's own), within `shard`'s documents and the `window` most recent
    keys; the output [b, heads, s / cp, hd] is a view of [s / cp, b, heads, hd] storage."""
    return _RingAttention.apply(q, k, v, shard, window)
