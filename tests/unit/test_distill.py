"""Distillation on the tiny pair: adapters, training, resume, and the exported GGUF."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType

from uplimit.coding.calibration import Calibration
from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.distill import lora
from uplimit.distill.collect import Answer, load_answers
from uplimit.distill.export import export_distilled, list_distilled
from uplimit.distill.train import TrainConfig, examples, split, train, turn_end
from uplimit.errors import ConfigError
from uplimit.models.hf import HFModel
from uplimit.models.store import sha256_file
from uplimit.models.tiny import export_gguf as tiny_gguf
from uplimit.wire.fingerprint import codec_fingerprint, differences
from uplimit.wire.frame import FrameConfig

TOPICS = (
    "def add(a, b):", "class Counter:", "def read_lines(path):", "import json", "for i in range(",
    "def fibonacci(n):", "while True:", "return sorted(", "with open(", "def softmax(x):",
    "print(", "if __name__ ==", "numbers = [", "try:", "def main():", "lambda x:",
)  # fmt: skip
GREEDY = SamplingParams(temperature=0.0)
CONFIG = TrainConfig(
    rank=4, alpha=8.0, learning_rate=2e-2, epochs=3, batch_tokens=256, max_len=64,
    holdout=0.25, dtype="float32", checkpoint_every=2,
)  # fmt: skip


@pytest.fixture(scope="module")
def answers(tiny_strong: HFModel) -> list[Answer]:
    """The strong tiny model's greedy answers, as the collector would record them."""
    messages = [[{"role": "user", "content": t}] for t in TOPICS]
    requests = [
        Request(tuple(tiny_strong.chat_tokens(m)), GREEDY, seed=0, max_tokens=24) for m in messages
    ]
    generations, _ = generate(tiny_strong, requests)
    return [
        Answer(
            id=f"t{i}",
            messages=m,
            temperature=0.0,
            seed=0,
            text=tiny_strong.detokenize([t for t in g.tokens if t not in tiny_strong.info.eos_ids]),
            finish_reason=g.finish_reason,
            tokens=len(g.tokens),
            uploaded_bits=0.0,
            payload_bits=0.0,
        )
        for i, (m, g) in enumerate(zip(messages, generations, strict=True))
    ]


def _logits(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0]


def test_attached_adapters_start_as_identity_and_merge_exactly(tiny_pair_dirs) -> None:
    model = HFModel(tiny_pair_dirs[1]).torch_model
    ids = list(range(5, 30))
    before = _logits(model, ids)
    adapters = lora.attach(model, rank=4, alpha=8.0, seed=1)
    assert len(adapters) == 7 * model.config.num_hidden_layers
    assert torch.equal(_logits(model, ids), before)  # B = 0
    with torch.no_grad():
        for a in adapters.values():
            a.b.normal_(0, 0.05)
    adapted = _logits(model, ids)
    assert (adapted - before).abs().max() > 1e-2
    lora.merge(model, adapters)
    assert not any(isinstance(m, lora.LoRALinear) for m in model.modules())
    torch.testing.assert_close(_logits(model, ids), adapted, atol=1e-4, rtol=1e-4)


def test_attach_refuses_a_model_without_targets() -> None:
    with pytest.raises(ConfigError, match="no linear layers"):
        lora.attach(torch.nn.Sequential(torch.nn.ReLU()), rank=2, alpha=2.0, seed=0)


def test_examples_end_with_the_turn_end_only_when_the_model_stopped(
    tiny_weak: HFModel, answers: list[Answer]
) -> None:
    end = turn_end(tiny_weak)
    assert end in tiny_weak.info.eos_ids
    data = examples(tiny_weak, answers, max_len=1000)
    for a, e in zip(answers, data, strict=True):
        assert e.tokens[: e.n_prompt] == tuple(tiny_weak.chat_tokens(a.messages))
        assert (e.tokens[-1] == end) == (a.finish_reason == "stop")
    train_set, held = split(data, 0.25, seed=0)
    held_prompts = {e.tokens[: e.n_prompt] for e in held}
    assert held and train_set
    assert not held_prompts & {e.tokens[: e.n_prompt] for e in train_set}


def test_training_lowers_held_out_bits_and_resumes_exactly(
    tiny_pair_dirs, answers: list[Answer], tmp_path: Path
) -> None:
    weak = HFModel(tiny_pair_dirs[1])
    train_set, held = split(examples(weak, answers, CONFIG.max_len), CONFIG.holdout, seed=0)
    adapters, result = train(weak.torch_model, train_set, held, CONFIG, tmp_path / "a")
    assert result.after.tokens == result.before.tokens > 0
    assert result.after.bits_per_token < 0.8 * result.before.bits_per_token
    assert result.after.top1 > result.before.top1

    class Crash(Exception):
        pass

    def crash_at_5(note: str, step: int, total: int) -> None:
        if step == 5:
            raise Crash

    resumed = HFModel(tiny_pair_dirs[1])
    with pytest.raises(Crash):
        train(resumed.torch_model, train_set, held, CONFIG, tmp_path / "b", progress=crash_at_5)
    again = HFModel(tiny_pair_dirs[1])
    adapters_b, result_b = train(again.torch_model, train_set, held, CONFIG, tmp_path / "b")
    assert result_b.before == result.before
    for name, a in lora.weight_deltas(adapters).items():
        assert torch.equal(lora.weight_deltas(adapters_b)[name], a)

    other = TrainConfig(**{**CONFIG.__dict__, "rank": 2})
    with pytest.raises(ConfigError, match="another run"):
        train(HFModel(tiny_pair_dirs[1]).torch_model, train_set, held, other, tmp_path / "b")


def test_exported_gguf_serves_the_merged_model(tiny_pair_dirs, tmp_path: Path) -> None:
    from uplimit.models.llama import LlamaModel

    weak = HFModel(tiny_pair_dirs[1])
    adapters = lora.attach(weak.torch_model, rank=4, alpha=8.0, seed=3)
    with torch.no_grad():
        for a in adapters.values():
            a.b.normal_(0, 0.05)
    base = tiny_gguf(tiny_pair_dirs[1])
    done = export_distilled(
        base,
        sha256_file(base),
        lora.weight_deltas(adapters),
        tmp_path,
        qtype=GGMLQuantizationType.F32,
        manifest={"note": "test"},
    )
    assert done.path.name == f"weak-{done.sha256[:16]}.gguf"
    [listed] = list_distilled(tmp_path)
    assert listed["sha256"] == done.sha256 and listed["note"] == "test"
    assert listed["adapted_tensors"] == len(adapters)
    assert listed["base_sha256"] == sha256_file(base)

    ids = weak.chat_tokens([{"role": "user", "content": "def add(a, b):"}])
    lora.merge(weak.torch_model, adapters)
    expected = _logits(weak.torch_model, ids)[-1].numpy()
    served = LlamaModel(done.path, n_threads=1)
    original = LlamaModel(base, n_threads=1)
    assert served.vocab_digest() == original.vocab_digest()
    with served.session(1, 128) as s, original.session(1, 128) as o:
        got = s.prefill(ids)[1]
        unchanged = o.prefill(ids)[1]
    # llama.cpp and torch round differently; the merge moves the logits 10x further than that.
    assert np.abs(got - expected).max() < 0.1 * np.abs(unchanged - expected).max()

    # A new weak model is a new codec: a side still on the old one is refused at the handshake.
    frame = FrameConfig(6, served.info.n_vocab)
    old = codec_fingerprint(original.info, Calibration(), frame)
    new = codec_fingerprint(served.info, Calibration(), frame)
    assert [d.key for d in differences(new, old)] == ["weak.sha256"]


def test_a_torn_last_record_is_skipped(tmp_path: Path, answers: list[Answer]) -> None:
    import json
    from dataclasses import asdict

    path = tmp_path / "answers.jsonl"
    path.write_text(json.dumps(asdict(answers[0])) + "\n" + '{"id": "t1", "mess')
    assert load_answers(path) == [answers[0]]
    path.write_text('{"id": 1}\n' + json.dumps(asdict(answers[0])) + "\n")
    with pytest.raises(ConfigError, match=":1:"):
        load_answers(path)
