"""FP8 local GEMMs: torchao on CPU trains like BF16; Transformer Engine on GPUs (gpu-marked)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megaolmo.config import ConfigError, Fp8Config, ModelConfig, OptimConfig, ParallelConfig
from megaolmo.data import GlobalBatches, MemmapDataset
from megaolmo.model.engine import ParallelOLMo
from megaolmo.train.optim import learning_rate

CONFIG = ModelConfig(
    d_model=64, n_layers=2, n_heads=4, ffn_hidden_size=96, vocab_size=512, max_sequence_length=64, kernels="torch"
)


def train_losses(dataset, linear: str, steps: int) -> list[float]:
    """Steps of bf16 training (fp32 master weights) from the same init on the same batches."""
    model = ParallelOLMo(
        dataclasses.replace(CONFIG, linear=linear), ParallelConfig(), seed=3, param_dtype=torch.bfloat16
    )
    optim = OptimConfig(lr=3e-3, warmup_steps=10)
    optimizer = torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=(0.9, 0.95), eps=1e-5, weight_decay=0.1)
    batches = GlobalBatches(MemmapDataset([dataset["train"]], 64), 8, seed=0)
    losses = []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(optim, step, steps)
        optimizer.zero_grad()
        batch = batches.batch(step)
        labels = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -100)], dim=1)
        losses.append(model.forward_backward(batch, labels, micro_batch_size=4).ce)
        model.clip_grad_norm_(1.0)
        optimizer.step()
    return losses


def test_torchao_fp8_trains_like_bf16(dataset) -> None:
    fp8, bf16 = train_losses(dataset, "torchao", 100), train_losses(dataset, "torch", 100)
    assert fp8[-1] < 0.8 * fp8[0]  # it learns
    end_fp8, end_bf16 = sum(fp8[-5:]) / 5, sum(bf16[-5:]) / 5
    assert abs(end_fp8 - end_bf16) <= 0.03 * end_bf16, (end_fp8, end_bf16)


def test_layers_that_fp8_cannot_run_stay_in_high_precision() -> None:
    config = dataclasses.replace(CONFIG, ffn_hidden_size=100, linear="torchao")  # 100 and 200: not multiples of 16
    model = ParallelOLMo(config, ParallelConfig())
    block = model.stages[0].blocks["0"]
    assert type(block.att_proj.linear).__name__ == "Float8Linear"
    assert type(block.ff_out.linear) is torch.nn.Linear
    assert model.high_precision_layers == ["blocks.0.ff_proj", "blocks.0.ff_out", "blocks.1.ff_proj", "blocks.1.ff_out"]


def test_first_and_last_blocks_can_stay_in_bf16() -> None:
    model = ParallelOLMo(
        dataclasses.replace(CONFIG, n_layers=3, linear="torchao"),
        ParallelConfig(),
        fp8=Fp8Config(keep_first_last_blocks_bf16=True),
    )
    kinds = [type(block.att_proj.linear).__name__ for block in model.stages[0].blocks.values()]
    assert kinds == ["Linear", "Float8Linear", "Linear"]


def test_transformer_engine_on_cpu_is_a_clear_error() -> None:
    if torch.cuda.is_available():
        return  # covered by the GPU tests below
    with pytest.raises(ConfigError, match="model.linear=te needs"):
        ParallelOLMo(dataclasses.replace(CONFIG, linear="te"), ParallelConfig())


def test_unknown_recipe_is_refused() -> None:
    with pytest.raises(ConfigError, match="fp8.te_recipe='fast' is not one of delayed, current, mxfp8"):
        Fp8Config(te_recipe="fast")


@pytest.mark.gpu
@pytest.mark.parametrize("recipe", ["delayed", "current"])
def test_transformer_engine_tracks_bf16_and_torchao(recipe: str) -> None:
    pytest.importorskip("transformer_engine")
    config = dataclasses.replace(CONFIG, d_model=256, ffn_hidden_size=512, kernels="triton")
    ids = torch.randint(0, 512, (8, 64), generator=torch.Generator().manual_seed(0))
    labels = torch.roll(ids, -1, 1)
    losses = {}
    for linear in ("torch", "torchao", "te"):
        model = ParallelOLMo(dataclasses.replace(config, linear=linear), ParallelConfig(), seed=1,
                             param_dtype=torch.bfloat16, fp8=Fp8Config(te_recipe=recipe))  # fmt: skip
        losses[linear] = model.forward_backward(ids, labels, micro_batch_size=4).ce
    assert abs(losses["te"] - losses["torch"]) < 0.02 * losses["torch"]
    assert abs(losses["te"] - losses["torchao"]) < 0.02 * losses["torch"]
