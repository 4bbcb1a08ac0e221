"""Inner-side distillation: the strong model's distributions as targets, and the int8 adapter."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from uplimit.distill import lora
from uplimit.distill.data import Example, SoftTargets, load_taught, save_taught
from uplimit.distill.teacher import teach, top_k
from uplimit.distill.train import TrainConfig, evaluate, loss_of, split, train
from uplimit.models.hf import HFModel
from uplimit.prompts import Prompt

TOPICS = (
    "def add(a, b):", "class Counter:", "def read_lines(path):", "import json", "for i in range(",
    "def fibonacci(n):", "while True:", "return sorted(", "with open(", "def softmax(x):",
    "print(", "if __name__ ==",
)  # fmt: skip
CONFIG = TrainConfig(
    rank=2, alpha=4.0, learning_rate=2e-2, epochs=3, batch_tokens=256, max_len=64,
    holdout=0.25, dtype="float32", checkpoint_every=2, targets=("down_proj",),
)  # fmt: skip


def _quiet(note: str, done: int, total: int) -> None:
    pass


@pytest.fixture(scope="module")
def taught(tiny_strong: HFModel) -> list[Example]:
    prompts = [Prompt(f"t{i}", ({"role": "user", "content": t},)) for i, t in enumerate(TOPICS)]
    return teach(
        tiny_strong, prompts, temperatures=(0.0, 1.0), max_tokens=20, k=8, seed=0, progress=_quiet
    )


def test_top_k_is_the_head_of_the_sorted_log_softmax() -> None:
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal((5, 300)) * 4).astype(np.float32)
    ids, logprobs = top_k(logits, 7)
    full = torch.log_softmax(torch.from_numpy(logits).double(), -1).numpy()
    for row in range(5):
        order = np.argsort(-full[row], kind="stable")[:7]
        assert list(ids[row]) == list(order)
        np.testing.assert_allclose(logprobs[row], full[row][order], rtol=1e-6)
    rest = SoftTargets(ids, logprobs).rest
    np.testing.assert_allclose(rest, 1 - np.exp(np.sort(full, 1)[:, -7:]).sum(1), atol=1e-6)


def test_the_teacher_gives_one_distribution_per_answer_token_in_order(
    taught: list[Example], tiny_strong: HFModel
) -> None:
    assert len(taught) == 2 * len(TOPICS)
    greedy = taught[: len(TOPICS)]
    for e in taught:
        assert e.targets is not None and len(e.targets.ids) == len(e.tokens) - e.n_prompt > 0
        assert np.all(np.diff(e.targets.logprobs, axis=1) <= 0)
    # A greedy answer is the teacher's argmax at every step: rows line up with tokens.
    for e in greedy:
        assert list(e.targets.ids[:, 0]) == list(e.tokens[e.n_prompt :])
    sampled = [e for e in taught[len(TOPICS) :] if e.targets is not None]
    assert any(
        list(e.targets.ids[:, 0]) != list(e.tokens[e.n_prompt :]) for e in sampled
    )  # T = 1 leaves the argmax somewhere


def test_taught_examples_survive_a_round_trip_and_a_foreign_file_is_refused(
    taught: list[Example], tmp_path: Path
) -> None:
    path = tmp_path / "taught.npz"
    save_taught(path, taught)
    back = load_taught(path)
    assert back == taught  # tokens and prompt lengths
    for a, b in zip(taught, back, strict=True):
        assert a.targets is not None and b.targets is not None
        assert np.array_equal(a.targets.ids, b.targets.ids)
        assert np.array_equal(a.targets.logprobs, b.targets.logprobs)
    with pytest.raises(ValueError, match="teacher's targets"):
        save_taught(path, [dataclasses.replace(taught[0], targets=None)])
    data = dict(np.load(path))
    data["lengths"] = data["lengths"][:-1]
    np.savez(tmp_path / "cut.npz", **data)
    with pytest.raises(ValueError):
        load_taught(tmp_path / "cut.npz")


def test_soft_loss_is_the_cross_entropy_against_the_coarsened_teacher() -> None:
    rng = np.random.default_rng(1)
    vocab, k = 50, 6
    teacher = rng.standard_normal((4, vocab)).astype(np.float32) * 3
    ids, logprobs = top_k(teacher, k)
    example = Example((1, 2, 3, 4, 5), 1, SoftTargets(ids, logprobs))
    logits = torch.from_numpy(rng.standard_normal((4, vocab)).astype(np.float32))
    got = loss_of(logits, torch.zeros(4, dtype=torch.long), [example])
    q = torch.softmax(logits.double(), -1).numpy()
    p = np.exp(logprobs.astype(np.float64))
    q_top = np.take_along_axis(q, ids, 1)
    expected = -(p * np.log(q_top)).sum(1) - (1 - p.sum(1)) * np.log(1 - q_top.sum(1))
    assert got.item() == pytest.approx(expected.mean(), rel=1e-5)
    # With every token kept it is the full cross-entropy, whose minimum is at q = p.
    ids, logprobs = top_k(teacher, vocab)
    full = Example((1, 2, 3, 4, 5), 1, SoftTargets(ids, logprobs))
    at_teacher = loss_of(torch.from_numpy(teacher), torch.zeros(4, dtype=torch.long), [full])
    assert at_teacher.item() < loss_of(logits, torch.zeros(4, dtype=torch.long), [full]).item()
    with pytest.raises(Exception, match="mixes"):
        loss_of(logits, torch.zeros(8, dtype=torch.long), [example, Example((1, 2), 1)])


def test_soft_targets_train_the_weak_model_toward_the_strong_one(
    tiny_pair_dirs, taught: list[Example], tmp_path: Path
) -> None:
    weak = HFModel(tiny_pair_dirs[1])
    train_set, held = split(taught, CONFIG.holdout, seed=0)
    before = evaluate(weak.torch_model, train_set, CONFIG.batch_tokens)
    adapters, result = train(weak.torch_model, train_set, held, CONFIG, tmp_path / "soft")
    assert len(adapters) == weak.torch_model.config.num_hidden_layers  # down_proj only
    after = evaluate(weak.torch_model, train_set, CONFIG.batch_tokens)
    # The loss is the teacher's cross-entropy, not the tokens': it is what falls.
    assert after.loss_bits < before.loss_bits - 0.02
    assert before.loss_bits != before.bits_per_token
    assert (
        result.after.tokens == result.before.tokens == sum(len(e.tokens) - e.n_prompt for e in held)
    )


def test_int8_rounding_keeps_the_adapter_within_half_a_step_and_counts_its_bytes() -> None:
    layer = torch.nn.Linear(40, 24)
    adapters = lora.attach(torch.nn.Sequential(layer), rank=3, alpha=6.0, seed=0, targets=("0",))
    adapter = adapters["0"]
    with torch.no_grad():
        adapter.b.normal_(0, 0.01)
        adapter.b[:, 2] = 0  # a component that never trained stays exactly zero
    a, b = adapter.a.detach().clone(), adapter.b.detach().clone()
    size = lora.quantize_int8_(adapters)
    assert size == 3 * (40 + 24) + 2 * (3 + 3)
    assert torch.all((adapter.a - a).abs() <= a.abs().amax(1, keepdim=True) / 127 / 2 * 1.01)
    assert torch.all((adapter.b - b).abs() <= b.abs().amax(0, keepdim=True) / 127 / 2 * 1.01)
    assert torch.all(adapter.b[:, 2] == 0)
    rounded = adapter.delta()
    lora.quantize_int8_(adapters)
    assert torch.equal(adapter.delta(), rounded)  # what is sent is already on the grid


def test_teach_command_reuses_the_teachers_data_and_reports_the_upload(
    tiny_pair_dirs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json
    import shutil

    from typer.testing import CliRunner

    from uplimit.cli import app
    from uplimit.models.tiny import export_gguf

    monkeypatch.setenv("UPLIMIT_HOME", str(tmp_path / "home"))
    weak = export_gguf(tiny_pair_dirs[1])
    strong = tmp_path / "strong"
    shutil.copytree(tiny_pair_dirs[0], strong)
    args = [
        "distill", "teach", "--workdir", str(tmp_path / "w"), "--count", "4",
        "--max-tokens", "12", "--top-k", "4", "--strong", str(strong),
        "--weak", str(weak), "--tokenizer-dir", str(tmp_path / "tok"), "--threads", "1",
    ]  # fmt: skip
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "wrote" in first.output and (tmp_path / "w" / "taught.npz").exists()
    hard = CliRunner().invoke(app, [*args, "--hard", "--no-export"])
    assert hard.exit_code == 0, hard.output
    assert "read the teacher's data" in hard.output
    layers = HFModel(tiny_pair_dirs[1]).torch_model.config
    for run in ("soft", "hard"):
        report = json.loads((tmp_path / "w" / run / "result.json").read_text())
        assert report["hard"] == (run == "hard")
        width = layers.intermediate_size + layers.hidden_size  # down_proj, rank 1
        assert report["upload_bytes"] == layers.num_hidden_layers * (width + 4)
        assert report["lifetime_budget_bytes"] is None  # not the pinned strong model
        saved = report["result"]["before"]["bits_per_token"] - report["rounded"]["bits_per_token"]
        if saved > 0:
            assert report["payback_tokens"] == pytest.approx(8 * report["upload_bytes"] / saved)
        else:
            assert report["payback_tokens"] is None
    # Another model at the teacher's path is another teacher: its data is made again.
    taught = tmp_path / "w" / "taught.json"
    before = json.loads(taught.read_text())["strong_sha256"]
    shutil.rmtree(strong)
    shutil.copytree(tiny_pair_dirs[1], strong)
    shutil.rmtree(tmp_path / "w" / "soft")  # its checkpoint is refused with new data
    other = CliRunner().invoke(app, [*args, "--no-export"])
    assert other.exit_code == 0, other.output
    assert "read the teacher's data" not in other.output
    assert json.loads(taught.read_text())["strong_sha256"] != before
