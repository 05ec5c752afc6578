"""OLMo's data controls: label masks beside the token memmaps, chat data prepared into tokens and masks, the
repetition filter, and the loss they give: the mean over the global batch's targets on every layout.

Tiny data written in place. One spawn of 2 gloo ranks checks data parallelism; the end-to-end test
fine-tunes a 1-step pretraining run's final weights on prepared chat data (two training subprocesses).
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from data_fixtures import small_tokenizer
from gloo_groups import run_each_on_its_group, spawn
from helpers import assert_ok, small_model
from training_run import TINY, _words, data_args, train

import megaolmo
from megaolmo.config import Config, DataConfig, ParallelConfig
from megaolmo.config.schema import InstanceFilterConfig
from megaolmo.data import (
    IGNORE_INDEX,
    Batch,
    DataError,
    GlobalBatches,
    MemmapDataset,
    RepetitionFilter,
    load_tokenizer,
    prepare,
    read_metadata,
    shifted_labels,
)
from megaolmo.data.chat import LABEL_MASK_DIR, label_mask_path
from megaolmo.data.prepare import main as prepare_main
from megaolmo.errors import ConfigError
from megaolmo.model.engine import ParallelOLMo
from megaolmo.train.loop import filtered_instances, training_batches

EOS = "<|endoftext|>"
OLMO_FILTER = RepetitionFilter(min_period=1, max_period=13, max_count=32)  # OLMo's InstanceFilterConfig defaults


# ---------------------------------------------------------------------------------------------
# Label masks beside the token files


def token_file(path: Path, tokens: np.ndarray, mask: np.ndarray | None = None) -> Path:
    """Raw uint16 tokens (OLMo's memmaps, no metadata) and, when given, their np.bool_ mask in label_masks/."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens.astype(np.uint16).tofile(path)
    if mask is not None:
        label_mask_path(path).parent.mkdir(exist_ok=True)
        mask.astype(np.bool_).tofile(label_mask_path(path))
    return path


def test_label_masks_are_read_beside_the_tokens(tmp_path: Path) -> None:
    """Directories pair file by file (the token files' names in label_masks/); mask[t] says whether token t is a
    target, so the label predicting token t from position t - 1 is kept or ignored (OLMo's get_labels)."""
    rng = np.random.default_rng(0)
    tokens = {name: rng.integers(2, 500, n) for name, n in [("a.npy", 21), ("b.npy", 16)]}
    masks = {name: rng.random(len(t)) < 0.5 for name, t in tokens.items()}
    for name, ids in tokens.items():
        token_file(tmp_path / "data" / name, ids, masks[name])
    dataset = MemmapDataset([tmp_path / "data"], 8, "uint16", label_mask_paths=[tmp_path / "data" / LABEL_MASK_DIR])
    assert len(dataset) == 2 + 2  # 21 // 8 + 16 // 8, tails dropped as for the tokens
    batch = dataset.get_batch([3, 0, 1])
    slices = [("b.npy", 8), ("a.npy", 0), ("a.npy", 8)]
    assert batch.input_ids.tolist() == [tokens[name][s : s + 8].tolist() for name, s in slices]
    assert batch.label_mask.tolist() == [masks[name][s : s + 8].tolist() for name, s in slices]
    assert batch.instance_mask is None
    labels = batch.labels()
    for row, (name, s) in enumerate(slices):
        for t in range(7):
            target = tokens[name][s + t + 1] if masks[name][s + t + 1] else IGNORE_INDEX
            assert labels[row, t] == target
        assert labels[row, 7] == IGNORE_INDEX
    batches = GlobalBatches(dataset, global_batch_size=2, seed=1)
    whole = batches.batch(0)
    for rank in range(2):  # a data-parallel rank reads its rows' masks only, the same as its share of the whole
        share = batches.batch(0, dp_rank=rank, dp=2)
        assert torch.equal(share.label_mask, GlobalBatches.dp_share(whole, rank, 2).label_mask)
    files = [tmp_path / "data" / name for name in tokens]  # files pair by position too
    listed = MemmapDataset(files, 8, "uint16", label_mask_paths=[label_mask_path(f) for f in files])
    assert torch.equal(listed.get_batch([3, 0]).label_mask, dataset.get_batch([3, 0]).label_mask)


def test_bad_label_masks_are_one_line_naming_the_files(tmp_path: Path) -> None:
    a = token_file(tmp_path / "a.npy", np.arange(20), np.ones(20))
    b = token_file(tmp_path / "b.npy", np.arange(12), np.ones(12))
    np.ones(12, dtype=np.uint16).tofile(tmp_path / "wide.npy")
    np.save(tmp_path / "saved.npy", np.ones(12, dtype=np.bool_))
    cases = [
        ([label_mask_path(a)], r"1 label mask files for 2 token files; give one mask per token file"),
        ([label_mask_path(b), label_mask_path(a)], r"label_masks/b\.npy has 12 entries but its token file .*a\.npy has 20"),
        ([label_mask_path(a), tmp_path / "wide.npy"], r"wide\.npy has 2 bytes per token of .*b\.npy .*np\.bool_"),
        ([label_mask_path(a), tmp_path / "saved.npy"], r"saved\.npy is an \.npy file with a header \(np\.save\)"),
        ([label_mask_path(a), tmp_path / "missing.npy"], r"label mask file .*missing\.npy does not exist"),
    ]  # fmt: skip
    for masks, message in cases:
        with pytest.raises(DataError, match=message) as err:
            MemmapDataset([a, b], 4, "uint16", label_mask_paths=masks)
        assert "\n" not in str(err.value)


def test_the_run_reads_its_masks_and_filter_from_the_config(tmp_path: Path) -> None:
    a = token_file(tmp_path / "data" / "a.npy", np.arange(160), np.arange(160) % 3 == 0)  # 20 instances of 8
    plain = SimpleNamespace(train=MemmapDataset([tmp_path / "data"], 8, "uint16"))  # what DataSources built
    data = DataConfig(paths=[str(tmp_path / "data")], dtype="uint16", label_mask_paths=[str(label_mask_path(a))],
                      instance_filter=InstanceFilterConfig(enabled=True))  # fmt: skip
    batches = training_batches(Config(data=data), plain, tmp_path / "run")
    assert batches.instance_filter == OLMO_FILTER and batches.order_dir == tmp_path / "run" / "data_order"
    batch = batches.batch(0)  # 16 instances, trainer.global_batch_size
    assert torch.equal(batch.label_mask, batch.input_ids % 3 == 0) and batch.instance_mask.all()
    assert training_batches(Config(), plain, tmp_path / "run").dataset is plain.train  # no controls: as built
    builtin = Config(data=DataConfig(label_mask_paths=[str(label_mask_path(a))]))
    with pytest.raises(ConfigError, match=r"data.label_mask_paths=\[.*a\.npy'\] needs data.paths"):
        training_batches(builtin, plain, tmp_path / "run")


# ---------------------------------------------------------------------------------------------
# Chat data


CONVERSATIONS = [
    {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the quick fox"},
                  {"role": "assistant", "content": "jumps over"}, {"role": "user", "content": "naïve <|endoftext|>"},
                  {"role": "assistant", "content": " the lazy dog 東京"}]},
    {"prompt": "data token", "response": "model seed", "source": "tulu"},
    {"messages": [{"role": "assistant", "content": "hi"}, {"role": "user", "content": "bye"}]},
]  # fmt: skip


def rendered(example: dict) -> tuple[str, str]:
    """(the tulu template's text, ending with EOS, the text of its targets): what a conversation should become."""
    turns = example.get("messages") or [
        {"role": "user", "content": example["prompt"]},
        {"role": "assistant", "content": example["response"]},
    ]
    text = targets = ""
    for i, turn in enumerate(turns):
        if turn["role"] == "assistant":
            text += f"<|assistant|>\n{turn['content']}{EOS}" + ("\n" if i < len(turns) - 1 else "")
            targets += turn["content"] + EOS
        else:
            text += f"<|{turn['role']}|>\n{turn['content']}\n"
    return (text if turns[-1]["role"] == "assistant" else text + EOS), targets


def write_jsonl(path: Path, examples: list[dict]) -> Path:
    path.write_text("".join(json.dumps(example, ensure_ascii=False) + "\n" for example in examples))
    return path


def test_chat_data_masks_in_the_assistant_turns(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    tokenizer_path = small_tokenizer(tmp_path / "tokenizer.json")
    chat = write_jsonl(tmp_path / "sft.jsonl", CONVERSATIONS)
    out = tmp_path / "out"
    args = ["--chat", str(chat), "--out", str(out), "--tokenizer", str(tokenizer_path), "--no-progress"]
    assert prepare_main(args) == 0
    assert f"data.label_mask_paths=[{out / LABEL_MASK_DIR}]" in capsys.readouterr().out
    tokens = np.fromfile(out / "sft.npy", dtype=np.uint16)
    mask = np.fromfile(out / LABEL_MASK_DIR / "sft.npy", dtype=np.bool_)
    assert len(mask) == len(tokens)
    tokenizer = load_tokenizer(tokenizer_path)
    texts, targets = zip(*(rendered(example) for example in CONVERSATIONS))
    # the template's text, packed back to back; the targets: the assistant contents and their EOS, nothing else
    assert tokenizer.decode(tokens.tolist(), skip_special_tokens=False) == "".join(texts)
    assert tokenizer.decode(tokens[mask].tolist(), skip_special_tokens=False) == "".join(targets)
    # EOS ids: the template's only (the literal one in a user turn is text), the last masked out (a user turn)
    assert np.flatnonzero(tokens == 0).size == 2 + 1 + 2 and not mask[-1] and tokens[-1] == 0
    meta = read_metadata(out)
    assert meta["label_masks"] == LABEL_MASK_DIR and meta["targets"] == int(mask.sum())
    assert meta["files"]["sft.npy"]["targets"] == int(mask.sum()) and meta["sources"] == ["sft", "tulu"]
    dataset = MemmapDataset([out], 4, label_mask_paths=[out / LABEL_MASK_DIR])
    assert dataset.get_batch([0]).label_mask.tolist() == [mask[:4].tolist()]


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"messages": [{"role": "user", "content": "hi"}]}', r"sft\.jsonl:2: the example has no assistant turn"),
        ("{not json", r"sft\.jsonl:2: not valid JSON"),
        ('{"messages": [{"role": "tool", "content": "42"}]}', r"sft\.jsonl:2: message 0 has role 'tool'; the roles are"),
        ('{"messages": [{"role": "user"}]}', r'sft\.jsonl:2: message 0 needs a string "role" and a string "content"'),
        ('{"text": "pretraining?"}', r'sft\.jsonl:2: an example needs "messages" .* or a string "prompt" and "response"'),
    ],
)  # fmt: skip
def test_bad_chat_data_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture, line: str, message: str) -> None:
    tokenizer_path = small_tokenizer(tmp_path / "tokenizer.json")
    chat = tmp_path / "sft.jsonl"
    chat.write_text(json.dumps(CONVERSATIONS[1]) + "\n" + line + "\n")
    args = ["--chat", str(chat), "--out", str(tmp_path / "out"), "--tokenizer", str(tokenizer_path), "--no-progress"]
    assert prepare_main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_chat_data_needs_the_models_tokenizer(tmp_path: Path) -> None:
    chat = write_jsonl(tmp_path / "sft.jsonl", CONVERSATIONS)
    with pytest.raises(DataError, match="--chat data is for fine-tuning a model: pass its tokenizer"):
        prepare([chat], tmp_path / "out", train_tokenizer_vocab=300, chat=True)


# ---------------------------------------------------------------------------------------------
# The repetition filter


def periodic_runs(tokens: list[int], min_period: int, max_period: int) -> list[tuple[int, int, int, int]]:
    """(start, end, period, times) of every run find_periodic_sequences reports, from its definition: a maximal
    stretch of tokens equal to the token `period` before, with at least 3 repeats (scalar, for checking)."""
    found = []
    for period in range(min_period, min(max_period, len(tokens) // 3) + 1):
        i = period
        while i < len(tokens):
            if tokens[i] != tokens[i - period]:
                i += 1
                continue
            start = i
            while i < len(tokens) and tokens[i] == tokens[i - period]:
                i += 1
            times = (i - start + period) // period
            if times >= 3:
                found.append((start - period, i, period, times))
    return found


def instance(run: list[int], length: int = 700) -> np.ndarray:
    """`run` amid tokens that never repeat (and differ from the run's)."""
    tokens = np.arange(1000, 1000 + length)
    tokens[20 : 20 + len(run)] = run
    return tokens


def test_repetition_filter_decides_as_olmo() -> None:
    """OLMo's defaults: a pattern of 1 to 13 tokens repeated 32 times in a row drops the instance; 31 times (and a
    half), or a pattern of 14 tokens however often, does not."""
    assert periodic_runs([5, 1, 2, 1, 2, 1, 2, 1, 2, 7], 1, 13) == [(1, 9, 2, 4)]  # OLMo's own example
    assert periodic_runs([9] * 40 + [3, 4], 1, 1) == [(0, 40, 1, 40)]
    thirteen, fourteen = list(range(13)), list(range(14))
    cases = {
        "period 1 x 32": (instance([7] * 32), False),
        "period 1 x 31": (instance([7] * 31), True),
        "period 2 x 32": (instance([3, 4] * 32), False),
        "period 2 x 31.5": (instance([3, 4] * 31 + [3]), True),
        "period 13 x 32": (instance(thirteen * 32), False),
        "period 13 x 31": (instance(thirteen * 31), True),
        "period 14 x 40": (instance(fourteen * 40), True),  # beyond repetition_max_period
        "no repeats": (np.arange(700), True),
    }
    kept = OLMO_FILTER.keep(np.stack([tokens for tokens, _ in cases.values()]))
    assert dict(zip(cases, kept.tolist())) == {name: keep for name, (_, keep) in cases.items()}
    for tokens, keep in cases.values():  # the definition agrees
        assert keep == all(times < 32 for *_, times in periodic_runs(tokens.tolist(), 1, 13))
    assert not RepetitionFilter(1, 14, 32).keep(cases["period 14 x 40"][0][None])[0]


@pytest.mark.parametrize("config", [(1, 13, 32), (1, 13, 3), (2, 5, 4), (1, 13, 1), (3, 40, 6)])
def test_repetition_filter_matches_the_definition_on_random_instances(config: tuple[int, int, int]) -> None:
    """Instances with planted repeats of patterns over 3 tokens (so the runs' ends match by chance), every row
    decided as the scalar definition decides it; a max_count under 3 acts as 3 (OLMo reports no run of fewer)."""
    min_period, max_period, max_count = config
    rng = np.random.default_rng(sum(config))
    rows = rng.integers(0, 40, (200, 160))
    for row in rows[::2]:  # about max_count repeats of a period of 1 to 14 over 3 tokens, cut by the row's end
        period, repeats, start = rng.integers(1, 15), rng.integers(max_count - 2, max_count + 3), rng.integers(0, 150)
        planted = np.tile(rng.integers(0, 3, period), max(repeats, 1))[: 160 - start]
        row[start : start + len(planted)] = planted
    kept = RepetitionFilter(min_period, max_period, max_count).keep(rows)
    expected = [all(t < max_count for *_, t in periodic_runs(row.tolist(), min_period, max_period)) for row in rows]
    assert kept.tolist() == expected and 0 < sum(expected) < len(rows)


def test_filtered_instances_keep_their_place_on_every_layout_and_after_a_resume(tmp_path: Path) -> None:
    tokens = np.arange(2, 2 + 64 * 16)
    repetitive = [1, 4, 6, 11]
    for i in repetitive:  # instance i holds one token 40 times in a row
        tokens[64 * i + 10 : 64 * i + 50] = 60000
    dataset = MemmapDataset([token_file(tmp_path / "tokens.npy", tokens)], 64, "uint16")
    batches = GlobalBatches(dataset, 8, seed=3, instance_filter=OLMO_FILTER)
    whole = [batches.batch(step) for step in range(4)]  # two epochs
    for step, batch in enumerate(whole):
        expected = ~np.isin(batches.indices(step), repetitive)
        assert batch.instance_mask.tolist() == expected.tolist()
        assert (batch.labels()[~batch.instance_mask] == IGNORE_INDEX).all()
        assert (batch.labels()[batch.instance_mask, :-1] != IGNORE_INDEX).all()
        for rank in range(4):
            share = batches.batch(step, dp_rank=rank, dp=4)
            assert torch.equal(share.instance_mask, GlobalBatches.dp_share(batch, rank, 4).instance_mask)
    resumed = GlobalBatches(dataset, 8, seed=3, instance_filter=OLMO_FILTER)
    resumed.load_state_dict(json.loads(json.dumps({**batches.state_dict(), "samples_seen": 16})))
    for batch in whole[2:]:
        assert torch.equal(resumed.next_batch().instance_mask, batch.instance_mask)
    assert RepetitionFilter.from_config(InstanceFilterConfig()) is None  # off unless enabled
    assert RepetitionFilter.from_config(InstanceFilterConfig(enabled=True)) == OLMO_FILTER
    with pytest.raises(ConfigError, match=r"repetition_max_period=0 must be an integer >= .*repetition_min_period=1"):
        InstanceFilterConfig(repetition_max_period=0)


# ---------------------------------------------------------------------------------------------
# The loss of masked data: the mean over the global batch's targets, whatever the micro-batches and DP ranks


MODEL = small_model(max_sequence_length=16, kernels="torch")  # vocab 256: no padded logits
TARGETS_PER_ROW = [1, 2, 3, 15, 15, 15, 15, 15]  # micro-batches of very different target counts


def masked_batch() -> Batch:
    """8 x 16 tokens whose rows keep TARGETS_PER_ROW[r] targets (the last ones); row 6 is filtered out."""
    generator = torch.Generator().manual_seed(1234)
    input_ids = torch.randint(0, MODEL.vocab_size, (8, 16), generator=generator)
    label_mask = torch.zeros(8, 16, dtype=torch.bool)
    for row, targets in enumerate(TARGETS_PER_ROW):
        label_mask[row, 16 - targets :] = True
    instance_mask = torch.ones(8, dtype=torch.bool)
    instance_mask[6] = False
    return Batch(input_ids, label_mask, instance_mask)


def step_of(model: ParallelOLMo, batch: Batch, micro_batch_size: int) -> tuple[float, int, dict[str, torch.Tensor]]:
    """(loss, targets, full gradients) of one forward-backward of `batch` (this DP rank's rows of it)."""
    for param in model.parameters():
        param.grad = None
    losses = model.forward_backward(batch.input_ids, batch.labels(), micro_batch_size)
    return losses.ce, losses.tokens, model.full_tensors(grads=True)


def autograd_of(model: ParallelOLMo, batch: Batch, loss_of) -> dict[str, torch.Tensor]:
    """Gradients of `loss_of(per-token cross entropy [b, s], labels)` by plain autograd on the one-process model."""
    (stage,) = model.stages
    stage.zero_grad(set_to_none=True)
    labels = batch.labels()
    logits = stage(batch.input_ids)
    per_token = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)
    loss_of(per_token, labels).backward()
    return {name: param.grad.clone() for name, param in stage.named_parameters()}


def mean_over_targets(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return per_token[labels != IGNORE_INDEX].mean()


def mean_of_row_means(per_token: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What per-micro-batch normalization (one row a micro-batch) gives: torchtitan's loss before its PR 2206."""
    targets = labels != IGNORE_INDEX
    rows = targets.any(1)
    return ((per_token * targets).sum(1)[rows] / targets.sum(1)[rows]).mean()


def test_masked_loss_is_the_mean_over_the_global_batchs_targets() -> None:
    """Micro-batches of 1 to 15 targets, and one of none (a filtered instance): the step's loss is the batch's
    summed cross entropy over its 66 targets, and its gradients those of that mean, not of a mean of
    per-micro-batch means."""
    batch = masked_batch()
    model = ParallelOLMo(MODEL, ParallelConfig(device="cpu"), seed=7)
    expected = autograd_of(model, batch, mean_over_targets)
    wrong = autograd_of(model, batch, mean_of_row_means)
    with torch.no_grad():
        labels = batch.labels()
        logits = model.stages[0](batch.input_ids).flatten(0, 1)
        loss = F.cross_entropy(logits, labels.flatten(), ignore_index=IGNORE_INDEX).item()
    ce, tokens, grads = step_of(model, batch, micro_batch_size=1)
    assert tokens == sum(TARGETS_PER_ROW) - TARGETS_PER_ROW[6] == 66
    assert ce == pytest.approx(loss, rel=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7, msg=name)
    gap = max((wrong[name] - grad).abs().max().item() / grad.abs().max().item() for name, grad in grads.items())
    assert gap > 0.1  # the test tells the two normalizations apart


@dataclass
class DataParallelSpec:
    name: str = "dp2"
    world_size: int = 2


def data_parallel_step(spec: DataParallelSpec, target: Path) -> None:
    """This rank's half of the masked batch (rank 0: 21 targets, 1 to 15 a row; rank 1: 45, row 6 filtered)."""
    model = ParallelOLMo(MODEL, ParallelConfig(device="cpu", dp=2), seed=7)
    share = GlobalBatches.dp_share(masked_batch(), model.mesh.dp_rank, 2)
    ce, tokens, grads = step_of(model, share, micro_batch_size=1)
    record = {"ce": ce, "tokens": tokens, "grads": grads, "filtered": filtered_instances(share, model)}
    torch.save(record, target / f"rank{dist.get_rank()}.pt")


def run_data_parallel(rank: int, specs: list[dict], out_dir: str) -> None:
    """Entry point of each spawned rank."""
    run_each_on_its_group(rank, [DataParallelSpec(**spec) for spec in specs], out_dir, data_parallel_step)


def test_masked_loss_over_data_parallel_ranks(tmp_path: Path) -> None:
    """At dp 2 the two ranks hold 21 and 45 targets: the loss and gradients are one process's (the targets
    counted over both ranks), and the filtered instances are counted over both."""
    spec = DataParallelSpec()
    spawn(run_data_parallel, ([dataclasses.asdict(spec)], str(tmp_path)), spec.world_size)
    errors = sorted((tmp_path / spec.name).glob("*.error"))
    assert not errors, errors[0].read_text()
    ranks = [torch.load(tmp_path / spec.name / f"rank{r}.pt") for r in range(2)]
    ce, tokens, grads = step_of(ParallelOLMo(MODEL, ParallelConfig(device="cpu"), seed=7), masked_batch(), 1)
    for record in ranks:
        assert record["tokens"] == tokens and record["filtered"] == 1
        assert record["ce"] == pytest.approx(ce, rel=1e-6)
        for name, grad in grads.items():
            torch.testing.assert_close(record["grads"][name], grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------
# Fine-tuning end to end


def chat_examples(n: int) -> list[dict]:
    """Conversations over the pretraining corpus's words; every third answer is one letter 300 times, the same
    token over and over: the instances it fills are filtered out."""
    rng = random.Random(3)
    words = _words()

    def say(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    examples = []
    for i in range(n):
        answer = "z" * 300 if i % 3 == 2 else say(rng.randint(8, 20))
        if i % 2:
            examples.append({"prompt": say(rng.randint(5, 15)), "response": answer})
            continue
        turns = [("system", say(4)), ("user", say(6)), ("assistant", say(5)), ("user", say(7)), ("assistant", answer)]
        examples.append({"messages": [{"role": role, "content": content} for role, content in turns]})
    return examples


def test_fine_tuning_trains_on_the_assistant_tokens_only(dataset, tmp_path: Path) -> None:
    """A 1-step pretraining run's final weights, fine-tuned (trainer.init_from) on chat data with its label masks
    and the repetition filter: the first step's loss is the one computed by hand with megaolmo.load of those
    weights on the first global batch's targets (assistant tokens of unfiltered instances), not on all tokens."""
    pretrain = tmp_path / "pretrain"
    assert_ok(train([*TINY, *data_args(dataset), "trainer.max_steps=1", "trainer.eval_interval=0"], pretrain))
    chat = write_jsonl(tmp_path / "sft.jsonl", chat_examples(40))
    sft = tmp_path / "sft"
    prepare([chat], sft, tokenizer_path=dataset["tokenizer"], chat=True, progress=False)
    masks = sft / LABEL_MASK_DIR
    args = [*TINY, "data=dolma", f"data.paths=[{sft}]", f"data.label_mask_paths=[{masks}]",
            f"data.tokenizer={dataset['tokenizer']}", "data.instance_filter.enabled=true",
            f"trainer.init_from={pretrain / 'final'}", "trainer.max_steps=2", "trainer.eval_interval=0"]  # fmt: skip
    assert_ok(train(args, tmp_path / "finetune"))
    records = [json.loads(line) for line in (tmp_path / "finetune" / "metrics.jsonl").read_text().splitlines()]
    first = next(r for r in records if r["step"] == 1)
    batches = GlobalBatches(MemmapDataset([sft], 64, label_mask_paths=[masks]), 8, seed=0, instance_filter=OLMO_FILTER)
    batch = batches.batch(0)
    assert first["filtered_instances"] == int((~batch.instance_mask).sum()) >= 1  # the hand check covers the filter
    model = megaolmo.load(pretrain / "final")
    with torch.no_grad():
        logits = model(batch.input_ids).flatten(0, 1)
    on_targets = F.cross_entropy(logits, batch.labels().flatten()).item()
    on_everything = F.cross_entropy(logits, shifted_labels(batch.input_ids).flatten()).item()
    assert first["loss"] == pytest.approx(on_targets, rel=1e-5)
    assert abs(on_everything - on_targets) > 1e-3 * on_targets  # 100x the tolerance: the masks made the loss
