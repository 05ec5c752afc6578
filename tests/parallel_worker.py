"""Runs training steps under many parallel layouts in one set of spawned CPU (gloo) ranks.

Starting Python processes costs more than most layouts take to test, so the
ranks are spawned once for many layouts (test_parallel: those of one world size)
and, for each layout, the first tp*pp*dp of them form a fresh process group
(a FileStore per layout), train, write their results, and tear the group down.
A layout that fails records its error and the next runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from gloo_groups import run_each_on_its_group
from helpers import resolved_model, small_model

from megaolmo.config import ModelConfig, ParallelConfig
from megaolmo.data.batch import Batch
from megaolmo.model.engine import ParallelOLMo

GLOBAL_BATCH, SEQ_LEN, STEPS, MAX_GRAD_NORM = 8, 16, 3, 1.0
# Where the document-masking layouts' rows end documents (EOS, the models' eos_token_id 0): at the row's end,
# first, twice in a row, nowhere, and a few documents shorter and longer than OLMo-3's window of 5.
EOS_POSITIONS = [[3, 9, 15], [0, 6, 7], [4, 5, 11], [], [2, 13], [7], [1, 8, 10, 14], [15]]
MODELS = {
    # vocab 1030 is not divisible by tp: the embedding pads to a multiple of 128 x tp.
    "tied": small_model(n_layers=4, vocab_size=1030, max_sequence_length=SEQ_LEN, weight_tying=True, kernels="torch"),
    "untied_gqa": small_model(
        n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=1030, max_sequence_length=SEQ_LEN,
        weight_tying=False, clip_qkv=0.5, kernels="torch",
    ),
    # OLMo-3: OLMo-2's block (RMSNorm after each sublayer, QK-norm over all heads), GQA, windows of 5 keys on
    # blocks 0-2 and full attention with YaRN on block 3 (scaled past an original context of 8).
    "olmo3": small_model(
        arch="olmo3", n_layers=4, n_heads=8, n_kv_heads=4, vocab_size=1030, max_sequence_length=SEQ_LEN,
        weight_tying=False, layer_norm_eps=1e-6, sliding_window=5, rope_theta=500000.0, rope_scaling="yarn",
        rope_scaling_factor=2.0, rope_original_max_position=8, kernels="torch",
    ),
    # OLMo-2 with a tied embedding (a norm weight on every stage, the embedding on the first and last).
    "olmo2_tied": small_model(
        arch="olmo2", n_layers=4, vocab_size=1030, max_sequence_length=SEQ_LEN, weight_tying=True,
        layer_norm_eps=1e-6, kernels="torch",
    ),
    # torchao FP8 GEMMs; under TP each rank scales its own shard, so results match one process only approximately.
    "fp8": small_model(
        n_layers=4, vocab_size=1030, max_sequence_length=SEQ_LEN, weight_tying=True, kernels="torch", linear="torchao"
    ),
}  # fmt: skip


@dataclass
class Layout:
    name: str
    model: str
    parallel: dict = field(default_factory=dict)
    micro_batch_size: int = 1
    z_loss: float = 1e-3
    document_masking: bool = False  # attention within the documents of global_batch(True), with its target masks
    loss_chunk_tokens: int | None = None  # the loss's logits a chunk of tokens at a time (one process: all at once)

    @property
    def world_size(self) -> int:
        p = self.parallel
        return p.get("tp", 1) * p.get("cp", 1) * p.get("pp", 1) * p.get("dp", 1)

    def parallel_config(self) -> ParallelConfig:
        return ParallelConfig(device="cpu", **self.parallel)


def global_batch(documents: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and their next-token labels. With `documents`, EOS exactly at EOS_POSITIONS, and the
    data's masks on the targets: a label mask dropping about a third of them (unevenly over rows, so
    micro-batches and DP ranks hold different counts) and one instance the repetition filter would drop."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, 1030, (GLOBAL_BATCH, SEQ_LEN), generator=generator)
    if not documents:
        return input_ids, Batch(input_ids).labels()
    eos = MODELS["tied"].eos_token_id
    input_ids[input_ids == eos] = eos + 1
    for row, positions in enumerate(EOS_POSITIONS):
        input_ids[row, positions] = eos
    keep = torch.rand(GLOBAL_BATCH, SEQ_LEN, generator=generator) > torch.linspace(0.0, 0.7, GLOBAL_BATCH)[:, None]
    instances = torch.ones(GLOBAL_BATCH, dtype=torch.bool)
    instances[5] = False
    return input_ids, Batch(input_ids, label_mask=keep, instance_mask=instances).labels()


def train(layout: Layout, config: ModelConfig) -> dict:
    """STEPS AdamW steps on the global batch; losses, norms, first-step gradients and final parameters (with
    document masking, the summed loss of an evaluation after them too)."""
    model = ParallelOLMo(
        config, layout.parallel_config(), seed=7, z_loss_multiplier=layout.z_loss,
        document_masking=layout.document_masking, loss_chunk_tokens=layout.loss_chunk_tokens,
    )  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    input_ids, labels = global_batch(layout.document_masking)
    share = GLOBAL_BATCH // model.mesh.dp
    rows = slice(model.mesh.dp_rank * share, (model.mesh.dp_rank + 1) * share)
    record: dict = {"ce": [], "z": [], "grad_norm": []}
    for step in range(STEPS):
        optimizer.zero_grad()
        losses = model.forward_backward(input_ids[rows], labels[rows], layout.micro_batch_size)
        if step == 0:
            record["grads"] = model.full_tensors(grads=True)
        record["grad_norm"].append(model.clip_grad_norm_(MAX_GRAD_NORM))
        optimizer.step()
        record["ce"].append(losses.ce)
        record["z"].append(losses.z)
    if layout.document_masking:  # evaluation masks the documents too (row_losses under every layout's schedule)
        record["eval_nll"] = model.evaluate(input_ids[rows], labels[rows], layout.micro_batch_size)[0]
    record["params"] = model.full_tensors()
    record["padded_vocab"] = model.config.padded_vocab_size
    return record


def reference(layout: Layout) -> dict:
    """The same training in this process, with no process group, at the layout's padded vocabulary."""
    config = resolved_model(MODELS[layout.model], layout.parallel_config(), layout.world_size)
    single = Layout("single", layout.model, {}, GLOBAL_BATCH, layout.z_loss, layout.document_masking)
    return train(single, config)


def run_layouts(rank: int, n_procs: int, layouts: list[dict], out_dir: str) -> None:
    """Entry point of each spawned rank."""

    def save(layout: Layout, target: Path) -> None:
        torch.save(train(layout, MODELS[layout.model]), target / f"rank{rank}.pt")

    run_each_on_its_group(rank, [Layout(**spec) for spec in layouts], out_dir, save)
