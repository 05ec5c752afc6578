"""TP layers: sharding by meaning, Megatron's collectives, megatron-core parity, cross entropy, validation."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from helpers import resolved_model, small_model
from tp_worker import BATCH, CONFIG, SEQ, run_checks

from megaolmo.config import ConfigError, ModelConfig, ParallelConfig
from megaolmo.model.engine import ParallelOLMo
from megaolmo.model.olmo import OLMoBlock
from megaolmo.parallel.cross_entropy import vocab_parallel_cross_entropy


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("tp2")
    mp.spawn(run_checks, args=(2, str(out)), nprocs=2, join=True)
    results = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert "error" not in result, result["error"]
    return results[0]


def test_block_collectives_without_sequence_parallelism(two_ranks: dict) -> None:
    """Megatron's count: two all-reduces of [s, b, h] forward (after each row-parallel), two backward."""
    calls = two_ranks["collectives"]["no_sp"]
    full = [SEQ, BATCH, CONFIG.d_model]
    assert calls["forward"] == [["all_reduce", full]] * 2
    assert calls["backward"] == [["all_reduce", full]] * 2


def test_block_collectives_with_sequence_parallelism(two_ranks: dict) -> None:
    """Per sublayer: all-gather before the column-parallel linear, reduce-scatter after the row-parallel one;
    backward: their transposes plus the all-gather that recovers the column-parallel input for its weight grad."""
    calls = two_ranks["collectives"]["sp"]
    full, shard = [SEQ, BATCH, CONFIG.d_model], [SEQ // 2, BATCH, CONFIG.d_model]
    sublayer = [["all_gather", full], ["reduce_scatter", shard]]
    assert calls["forward"] == sublayer * 2
    backward = sorted((name, tuple(shape)) for name, shape in calls["backward"])
    assert backward == [("all_gather", tuple(full))] * 4 + [("reduce_scatter", tuple(shard))] * 2


def test_activation_memory_per_block_within_megatrons_bound(two_ranks: dict) -> None:
    """With SP and the fused kernels a bf16 block keeps at most Megatron's 34 * s * b * h / tp bytes."""
    saved, bound = two_ranks["activation_bytes"]
    assert saved <= bound, (saved, bound)


def test_megatron_core_layers_agree(two_ranks: dict) -> None:
    assert set(two_ranks["megatron"]) == {"column", "row", "embedding", "cross_entropy"}
    for name, diff in two_ranks["megatron"].items():
        assert diff < 1e-5, (name, diff)


def fake_tp(rank: int, size: int = 2) -> SimpleNamespace:
    return SimpleNamespace(size=size, rank=rank, sequence_parallel=False)


def test_fused_weights_are_sharded_by_meaning_not_by_rows() -> None:
    """Each rank gets whole heads of q, k and v, and matching halves of up and gate; a plain row split does not."""
    config = ModelConfig(d_model=8, n_layers=1, n_heads=4, n_kv_heads=2, ffn_hidden_size=6, vocab_size=16)
    block = OLMoBlock(config, 0)
    hd = config.head_dim
    qkv = torch.arange(block.att_proj.out_features, dtype=torch.float32)[:, None].expand(-1, 8)
    for rank in (0, 1):
        block.att_proj.tp = fake_tp(rank)
        rows = block.att_proj.shard_full(qkv)[:, 0].long().tolist()
        q = list(range(rank * 2 * hd, (rank + 1) * 2 * hd))  # heads 2r, 2r+1
        k = [4 * hd + i for i in range(rank * hd, (rank + 1) * hd)]  # kv head r
        v = [6 * hd + i for i in range(rank * hd, (rank + 1) * hd)]
        assert rows == q + k + v
        naive = qkv.chunk(2)[rank][:, 0].long().tolist()
        assert naive != rows  # rank 0 would get all of q and nothing of k or v
        block.ff_proj.tp = fake_tp(rank)
        ff_rows = block.ff_proj.shard_full(torch.arange(12.0)[:, None])[:, 0].long().tolist()
        assert ff_rows == [3 * rank, 3 * rank + 1, 3 * rank + 2, 6 + 3 * rank, 7 + 3 * rank, 8 + 3 * rank]


def test_cross_entropy_matches_torch_with_z_loss_and_ignored_tokens() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 40, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 40, (5, 3))
    labels[0, 0] = -100
    ce, log_z = vocab_parallel_cross_entropy(logits, labels)
    valid = labels != -100
    loss = ce.sum() + 1e-2 * (log_z.pow(2) * valid).sum()
    (grad,) = torch.autograd.grad(loss, logits)
    reference_logits = logits.detach().clone().requires_grad_()
    reference = F.cross_entropy(reference_logits.reshape(-1, 40), labels.reshape(-1), reduction="sum")
    reference = reference + 1e-2 * (reference_logits.logsumexp(-1).pow(2) * valid).sum()
    (reference_grad,) = torch.autograd.grad(reference, reference_logits)
    assert torch.allclose(loss, reference) and torch.allclose(grad, reference_grad)
    assert ce[0, 0] == 0


MODEL = small_model(n_layers=4, n_kv_heads=2, vocab_size=1000)


@pytest.mark.parametrize(
    ("parallel", "world", "message"),
    [
        ({"tp": 2, "pp": 2}, 6, "world size 6 is not parallel.tp=2 x parallel.pp=2 x parallel.dp=inferred"),
        ({"tp": 2, "dp": 2}, 8, "world size 8 is not parallel.tp=2 x parallel.pp=1 x parallel.dp=2"),
        ({"tp": 8}, 8, "model.n_heads=4 is not divisible by parallel.tp=8"),
        ({"tp": 4}, 4, "model.n_kv_heads=2 is not divisible by parallel.tp=4"),
        ({"pp": 3}, 3, "model.n_layers=4 does not divide into 3 pipeline stages"),
        ({"pp": 2, "pp_layer_split": [1, 2]}, 2, r"parallel.pp_layer_split=\[1, 2\] must have 2 entries"),
        ({"pp": 2, "vp": 4, "pp_schedule": "interleaved_1f1b"}, 2, "does not divide into 8 pipeline stages"),
        ({"vp": 2, "pp_schedule": "interleaved_1f1b"}, 1, "parallel.vp=2 needs parallel.pp > 1"),
    ],
)
def test_invalid_layouts_fail_before_any_group_exists(parallel: dict, world: int, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        resolved_model(MODEL, ParallelConfig(**parallel), world)
    assert "\n" not in str(info.value)


def test_layout_errors_of_the_model_widths() -> None:
    with pytest.raises(ConfigError, match="model.ffn_hidden_size=90 is not divisible by parallel.tp=4"):
        resolved_model(ModelConfig(d_model=64, n_heads=4, ffn_hidden_size=90), ParallelConfig(tp=4), 4)
    with pytest.raises(ConfigError, match="model.embedding_size=1001 is not divisible by parallel.tp=2"):
        resolved_model(ModelConfig(d_model=64, vocab_size=1000, embedding_size=1001), ParallelConfig(tp=2), 2)


def test_embedding_pads_to_a_multiple_of_128_times_tp() -> None:
    assert resolved_model(ModelConfig(vocab_size=1030), ParallelConfig(tp=4), 4).padded_vocab_size == 1536
    assert resolved_model(ModelConfig(vocab_size=1030), ParallelConfig(), 1).padded_vocab_size == 1152


@pytest.mark.parametrize(
    ("parallel", "message"),
    [
        ({"pp_schedule": "interleaved_1f1b"}, "needs parallel.vp >= 2"),
        ({"pp": 2, "vp": 2}, "parallel.vp=2 needs an interleaved pp_schedule, not 1f1b"),
        ({"pp_schedule": "zb"}, "parallel.pp_schedule='zb' is not one of"),
        ({"tp": 0}, "parallel.tp=0 must be a positive integer"),
        ({"activation_checkpointing": "some"}, "parallel.activation_checkpointing='some' is not one of"),
        ({"device": "tpu"}, "parallel.device='tpu' is not one of"),
    ],
)
def test_invalid_parallel_configs(parallel: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ParallelConfig(**parallel)


def test_batch_not_divisible_by_the_micro_batch_is_refused() -> None:
    model = ParallelOLMo(ModelConfig(d_model=32, n_layers=1, n_heads=2, ffn_hidden_size=32), ParallelConfig())
    ids = torch.zeros(3, 8, dtype=torch.long)
    with pytest.raises(ConfigError, match="batch of 3 sequences is not divisible by micro_batch_size=2"):
        model.forward_backward(ids, ids, micro_batch_size=2)
