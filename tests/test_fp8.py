"""FP8 local GEMMs: torchao on CPU (emulated) trains like BF16; the real FP8 GEMMs and Transformer Engine on GPUs.

On CPU, torchao's FP8 is emulated (`fp8.emulate=auto`): the float8 casts and scales of the real
path, the matmuls in high precision, so these tests check megaolmo's FP8 wiring in seconds on any
CPU. `torch._scaled_mm` itself runs here only on a tiny shape (its CPU reference path is scalar);
the real FP8 GEMMs run in the gpu-marked tests.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from helpers import assert_ok
from omegaconf import OmegaConf
from training_run import TINY, data_args, train

from megaolmo.config import ConfigError, Fp8Config, ModelConfig, OptimConfig, ParallelConfig
from megaolmo.data import GlobalBatches, MemmapDataset
from megaolmo.model.engine import ParallelOLMo
from megaolmo.model.fp8 import has_fp8_gemm
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
        batch = batches.batch(step).input_ids
        labels = torch.cat([batch[:, 1:], torch.full_like(batch[:, :1], -100)], dim=1)
        losses.append(model.forward_backward(batch, labels, micro_batch_size=4).ce)
        model.clip_grad_norm_(1.0)
        optimizer.step()
    return losses


def test_torchao_fp8_trains_like_bf16(dataset) -> None:
    # 40 steps: bf16 matmuls are slow on CPUs without AVX512-BF16 (35x slower than fp32 on some).
    fp8, bf16 = train_losses(dataset, "torchao", 40), train_losses(dataset, "torch", 40)
    assert fp8[-1] < 0.8 * fp8[0]  # it learns
    end_fp8, end_bf16 = sum(fp8[-5:]) / 5, sum(bf16[-5:]) / 5
    assert abs(end_fp8 - end_bf16) <= 0.03 * end_bf16, (end_fp8, end_bf16)


def fp8_linears(model: ParallelOLMo) -> list[torch.nn.Module]:
    return [m for stage in model.stages for m in stage.modules() if type(m).__name__ == "Float8Linear"]


def batch(rows: int, seq_len: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (rows, seq_len), generator=torch.Generator().manual_seed(0))
    return ids, torch.roll(ids, -1, 1)


def counting_scaled_mm(monkeypatch: pytest.MonkeyPatch, real) -> list[torch.Size]:
    """Replace torch._scaled_mm by `real` (None: raise) that records the shape of each first operand."""
    calls: list[torch.Size] = []

    def scaled_mm(a, *args, **kwargs):
        calls.append(a.shape)
        if real is None:
            raise AssertionError("torch._scaled_mm called: FP8 should be emulated here")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    return calls


def test_cpu_fp8_is_emulated_never_calls_scaled_mm_and_quantizes(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_scaled_mm(monkeypatch, real=None)
    cpu = ParallelConfig(device="cpu")
    fp8 = ParallelOLMo(dataclasses.replace(CONFIG, linear="torchao"), cpu, seed=3)  # the default fp8.emulate=auto
    fp32 = ParallelOLMo(CONFIG, cpu, seed=3)
    assert fp8.fp8_emulated and not fp32.fp8_emulated
    assert len(fp8_linears(fp8)) == 8 and all(m.config.emulate for m in fp8_linears(fp8))
    ids, labels = batch(8, 64, CONFIG.vocab_size)
    loss_fp8, loss_fp32 = (model.forward_backward(ids, labels, micro_batch_size=4).ce for model in (fp8, fp32))
    assert calls == []
    # Quantized: not the fp32 result, but close to it (float8 has 3 mantissa bits in the forward).
    assert loss_fp8 != loss_fp32 and abs(loss_fp8 - loss_fp32) <= 0.02 * loss_fp32, (loss_fp8, loss_fp32)
    grad_fp8, grad_fp32 = (model.full_tensors(grads=True)["blocks.0.ff_proj.linear.weight"] for model in (fp8, fp32))
    error = ((grad_fp8 - grad_fp32).norm() / grad_fp32.norm()).item()
    assert 1e-4 < error < 0.2, error


@pytest.mark.real_scaled_mm
def test_emulate_false_on_cpu_takes_the_real_path_which_emulation_matches(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_scaled_mm(monkeypatch, real=torch._scaled_mm)
    # Tiny: the CPU reference path of torch._scaled_mm is scalar (0.06 GFLOP/s on some CPUs).
    tiny = ModelConfig(d_model=16, n_layers=1, n_heads=1, ffn_hidden_size=16, vocab_size=128,
                       max_sequence_length=16, kernels="torch", linear="torchao")  # fmt: skip
    models = {
        emulate: ParallelOLMo(tiny, ParallelConfig(device="cpu"), seed=3, fp8=Fp8Config(emulate=emulate))
        for emulate in ("false", "true")
    }
    ids, labels = batch(1, 16, tiny.vocab_size)
    real = models["false"]
    assert not real.fp8_emulated and not any(m.config.emulate for m in fp8_linears(real))
    real_loss = real.forward_backward(ids, labels, micro_batch_size=1).ce
    assert len(calls) == 3 * len(fp8_linears(real)) == 12  # output, grad input, grad weight of each FP8 linear
    calls.clear()
    emulated_loss = models["true"].forward_backward(ids, labels, micro_batch_size=1).ce
    assert calls == [] and models["true"].fp8_emulated
    # The same float8 casts and tensorwise scales: only the matmul's precision differs.
    assert abs(real_loss - emulated_loss) <= 1e-4 * real_loss, (real_loss, emulated_loss)


def test_emulate_is_validated_and_read_from_the_command_line() -> None:
    with pytest.raises(ConfigError, match="^fp8.emulate='maybe' is not one of auto, true, false$"):
        Fp8Config(emulate="maybe")
    for value in ("true", "false", "auto"):  # Hydra's `true`/`false` reach a str field as "True"/"False"
        config = OmegaConf.merge(OmegaConf.structured(Fp8Config), OmegaConf.from_dotlist([f"emulate={value}"]))
        assert OmegaConf.to_object(config).emulate == value
    assert Fp8Config().emulate == "auto"


def test_training_says_once_that_fp8_is_emulated(dataset, tmp_path: Path) -> None:
    args = [*TINY, *data_args(dataset), "model.linear=torchao", "parallel.device=cpu", "trainer.max_steps=1",
            "trainer.eval_interval=0"]  # fmt: skip
    result = train(args, tmp_path / "run")
    assert_ok(result)
    assert result.stdout.count("FP8: emulated") == 1, result.stdout


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


@pytest.mark.gpu
def test_gpus_with_fp8_gemm_run_scaled_mm_and_older_ones_emulate(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = counting_scaled_mm(monkeypatch, real=torch._scaled_mm)
    config = dataclasses.replace(CONFIG, d_model=256, ffn_hidden_size=512, kernels="triton", linear="torchao")
    ids, labels = batch(8, 64, config.vocab_size)
    model = ParallelOLMo(config, ParallelConfig(), seed=1, param_dtype=torch.bfloat16)
    model.forward_backward(ids, labels, micro_batch_size=4)
    if has_fp8_gemm(model.mesh.device):
        assert not model.fp8_emulated and len(calls) == 3 * len(fp8_linears(model))
    else:
        assert model.fp8_emulated and calls == []
        with pytest.raises(ConfigError, match="has no FP8 .* or fp8.emulate=auto"):
            ParallelOLMo(config, ParallelConfig(), fp8=Fp8Config(emulate="false"))
