"""Gauge transforms on tiny models: same function, new weights, GQA and RoPE respected; verify,
the rotation schedule and its audit, the matching attacks, the CLI.

Tolerance: the tiny fp32 model's logits (scale ~40) move by ~1e-4 under a gauge, as much as its
own fp32-vs-fp64 error (6e-5): summation order is all that changes. Tests allow 1e-3.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    GPT2Config,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from typer.testing import CliRunner

from uplimit.cli import app
from uplimit.errors import ConfigError, ModelPairError
from uplimit.gauge import attack
from uplimit.gauge.schedule import GaugeAudit, GaugeRecord, GaugeSchedule
from uplimit.gauge.transform import Dims, apply_gauge, gauge_bits, gauge_files, random_gauge
from uplimit.gauge.verify import DEFAULT_CHATS, compare
from uplimit.models.hf import HFModel
from uplimit.models.tiny import export_gguf

TOLERANCE = 1e-3
IDS = torch.randint(0, 600, (3, 40), generator=torch.Generator().manual_seed(0))  # [B, T]
OPTIONS = [{}, {"residual": False}, {"signs": False}, {"residual": False, "signs": False}]


def logits(model: PreTrainedModel, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids).logits


def gauged(model: PreTrainedModel, seed: int, **options: bool) -> PreTrainedModel:
    copied = copy.deepcopy(model)
    apply_gauge(copied, random_gauge(copied.config, seed, **options))
    return copied


def same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal as multisets of absolute values: what moving and negating entries preserves."""
    return torch.equal(a.abs().flatten().sort().values, b.abs().flatten().sort().values)


def small(config_class: type, model_class: type, **extra: object) -> PreTrainedModel:
    """A random 2-layer model with random norm weights and biases (so nothing passes on 0s/1s)."""
    config = config_class(
        vocab_size=96,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        **extra,
    )
    with torch.random.fork_rng():
        torch.manual_seed(1)
        model = model_class(config)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "norm" in name:
                    param.normal_(1.0, 0.2)
                elif name.endswith(".bias"):
                    param.normal_(0.0, 0.2)
                else:
                    param.normal_(0.0, 0.3)
    return model.eval()


@pytest.fixture(scope="module")
def strong(tiny_strong: HFModel) -> PreTrainedModel:
    return tiny_strong.torch_model


@pytest.fixture(scope="module")
def gauged_dir(tiny_pair_dirs: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("gauged") / "strong-g11"
    gauge_files(tiny_pair_dirs[0], out, seed=11)
    return out


# --- the transform is exact ------------------------------------------------------------------


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(o) or "all")
def test_same_logits_and_greedy_tokens(strong: PreTrainedModel, options: dict) -> None:
    expected, got = logits(strong), logits(gauged(strong, 3, **options))
    assert (got - expected).abs().max().item() <= TOLERANCE
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


ARCHITECTURES = {
    "qwen2-tied": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": True}),
    "llama-biases": (LlamaConfig, LlamaForCausalLM, {"attention_bias": True, "mlp_bias": True}),
    "mistral": (MistralConfig, MistralForCausalLM, {}),
}


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_other_architectures_and_tied_embeddings(architecture: str) -> None:
    config_class, model_class, extra = ARCHITECTURES[architecture]
    model = small(config_class, model_class, **extra)
    ids = IDS % model.config.vocab_size
    moved = gauged(model, 5)
    assert (logits(moved, ids) - logits(model, ids)).abs().max().item() <= TOLERANCE
    if model.config.tie_word_embeddings:
        assert moved.lm_head.weight is moved.model.embed_tokens.weight
        assert not torch.equal(moved.lm_head.weight, model.lm_head.weight)


def test_every_weight_changes_and_keeps_its_values(strong: PreTrainedModel) -> None:
    """No part is the identity by accident; values are only moved and negated (exact)."""
    moved = dict(gauged(strong, 3).named_parameters())
    for name, before in strong.named_parameters():
        after = moved[name]
        assert not torch.equal(after, before), name
        assert same_values(after, before), name


def test_gauges_compose_without_drift(strong: PreTrainedModel) -> None:
    """Twenty re-gauges in a row, as a schedule does to one serving copy: still exact."""
    model = copy.deepcopy(strong)
    for seed in range(20):
        apply_gauge(model, random_gauge(model.config, seed))
    assert (logits(model) - logits(strong)).abs().max().item() <= TOLERANCE
    moved = dict(model.named_parameters())
    for name, before in strong.named_parameters():
        assert same_values(moved[name], before), name


def test_grouped_query_attention_constraints(strong: PreTrainedModel) -> None:
    dims = Dims.of(strong.config)
    hd, group = dims.head_dim, dims.group
    kv_orders = set()
    for seed in range(8):
        for layer in random_gauge(strong.config, seed).layers:
            kv_orders.add(tuple(layer.kv_perm))
            assert sorted(layer.q_perm) == list(range(dims.n_heads))
            for j, old in enumerate(layer.q_perm):  # a query head stays with its KV head
                assert old // group == layer.kv_perm[j // group]
            spaces = layer.spaces(dims)
            q_sign = spaces["q"].sign.reshape(dims.n_heads, hd)
            k_sign = spaces["k"].sign.reshape(dims.n_kv_heads, hd)
            # Rotary pairs (i, i + hd/2) share a sign, and query heads share their KV head's.
            assert np.array_equal(k_sign[:, : hd // 2], k_sign[:, hd // 2 :])
            assert np.array_equal(q_sign, np.repeat(k_sign, group, axis=0))
            # Query dims stay in place within a head: RoPE ties each dim to a frequency.
            q_index = spaces["q"].index.reshape(dims.n_heads, hd)
            assert np.array_equal(q_index % hd, np.broadcast_to(np.arange(hd), q_index.shape))
    assert len(kv_orders) == 2  # both orders of the 2 KV heads occur


def test_permuting_inside_a_rotary_head_is_not_a_gauge(strong: PreTrainedModel) -> None:
    """Without RoPE, shuffling Q and K dims alike would be exact; with it, it is not."""
    model = copy.deepcopy(strong)
    dims = Dims.of(model.config)
    shuffle = torch.randperm(dims.head_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj):
                n = proj.weight.shape[0] // dims.head_dim
                rows = (torch.arange(n)[:, None] * dims.head_dim + shuffle).flatten()
                proj.weight.copy_(proj.weight[rows])
                proj.bias.copy_(proj.bias[rows])
    assert (logits(model) - logits(strong)).abs().max().item() > 1.0


def test_seed_fixes_the_gauge(strong: PreTrainedModel) -> None:
    assert random_gauge(strong.config, 1).digest() == random_gauge(strong.config, 1).digest()
    assert random_gauge(strong.config, 1).digest() != random_gauge(strong.config, 2).digest()


def test_unknown_parameters_and_architectures_are_refused(strong: PreTrainedModel) -> None:
    model = copy.deepcopy(strong)
    model.model.layers[0].register_parameter("extra", torch.nn.Parameter(torch.ones(3)))
    before = model.model.embed_tokens.weight.clone()
    with pytest.raises(ConfigError, match="extra"):
        apply_gauge(model, random_gauge(model.config, 0))
    assert torch.equal(model.model.embed_tokens.weight, before)  # nothing changed
    with pytest.raises(ConfigError, match="gpt2"):
        Dims.of(GPT2Config())
    other = small(Qwen2Config, Qwen2ForCausalLM)
    with pytest.raises(ConfigError, match="gauge drawn for"):
        apply_gauge(other, random_gauge(strong.config, 0))


def test_gauge_bits() -> None:
    dims = Dims(n_layers=2, hidden=4, intermediate=3, n_heads=4, n_kv_heads=2, head_dim=2)
    log2 = np.log2
    # per layer: 3! neurons, 2! KV orders, (2!)^2 in-group orders, (2!)^2 value-dim orders
    perms = 2 * log2(6 * 2 * 4 * 4) + log2(24)
    assert gauge_bits(dims, signs=False) == pytest.approx(perms)
    # signs: 3 neurons, 2 x 2 value dims, 2 x 1 rotary pairs per layer; 4 residual dims
    assert gauge_bits(dims) == pytest.approx(perms + 2 * (3 + 4 + 2) + 4)
    assert gauge_bits(dims, residual=False, signs=False) == pytest.approx(2 * log2(192))


# --- verify ------------------------------------------------------------------------------------


def test_verify_passes_on_a_gauge(tiny_pair_dirs: tuple[Path, Path], gauged_dir: Path) -> None:
    report = compare(tiny_pair_dirs[0], gauged_dir, DEFAULT_CHATS[:4], answer_tokens=12)
    assert report.ok and report.max_abs_diff <= TOLERANCE
    assert report.greedy_agreement == 1.0 and report.same_answers == 4
    assert report.positions > 4 * 12
    report.check()


def test_verify_fails_loudly_on_other_changes(
    tiny_pair_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    strong_dir, weak_dir = tiny_pair_dirs
    # 1.5 % weight noise (the tiny weak model).
    report = compare(strong_dir, weak_dir, DEFAULT_CHATS[:2], answer_tokens=8)
    assert not report.ok and report.max_abs_diff > 0.1
    with pytest.raises(ModelPairError, match="models differ"):
        report.check()
    # A permutation applied to the gate rows only: half a gauge is not a gauge.
    hf = HFModel(strong_dir)
    gate = hf.torch_model.model.layers[1].mlp.gate_proj.weight
    with torch.no_grad():
        gate.copy_(gate[torch.randperm(gate.shape[0], generator=torch.Generator().manual_seed(0))])
    hf.torch_model.save_pretrained(tmp_path / "broken")
    hf.tokenizer.save_pretrained(tmp_path / "broken")
    report = compare(strong_dir, tmp_path / "broken", DEFAULT_CHATS[:2], answer_tokens=8)
    assert not report.ok and report.max_abs_diff > 0.1


def test_gauge_files_writes_no_seed_and_refuses_a_full_dir(
    tiny_pair_dirs: tuple[Path, Path], gauged_dir: Path
) -> None:
    config = json.loads((gauged_dir / "config.json").read_text())
    assert "seed" not in json.dumps(config) and "gauge" not in json.dumps(config)
    with pytest.raises(ConfigError, match="not an empty directory"):
        gauge_files(tiny_pair_dirs[0], gauged_dir, seed=1)


def test_gauge_files_from_a_gguf(tiny_pair_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """A GGUF loads with transformers' quantizer attached; the output must still save."""
    gguf = export_gguf(tiny_pair_dirs[0])
    done = gauge_files(gguf, tmp_path / "from-gguf", seed=2, tokenizer_dir=tmp_path / "tok")
    assert compare(tiny_pair_dirs[0], done.out, DEFAULT_CHATS[:2], answer_tokens=8).ok


# --- CLI ---------------------------------------------------------------------------------------


def test_cli_apply_and_verify(tiny_pair_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    strong_dir, weak_dir = map(str, tiny_pair_dirs)
    runner = CliRunner()
    out = str(tmp_path / "g")
    apply = ["gauge", "apply", "--model", strong_dir, "--seed", "4", "--out", out]
    result = runner.invoke(app, apply)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["gauge", "verify", strong_dir, out, "--answer-tokens", "4"])
    assert result.exit_code == 0, result.output
    assert "100.00 %" in result.output
    result = runner.invoke(app, ["gauge", "verify", strong_dir, weak_dir, "--answer-tokens", "4"])
    assert result.exit_code == 1


# --- schedule and audit ------------------------------------------------------------------------

SECRET = bytes(range(32))


def test_schedule_epochs_and_seeds() -> None:
    schedule = GaugeSchedule(SECRET, period_s=3600.0, origin=1000.0)
    assert schedule.epoch(1000.0) == 0
    assert schedule.epoch(4599.9) == 0 and schedule.epoch(4600.0) == 1
    assert schedule.starts(3) == 1000.0 + 3 * 3600
    assert schedule.epoch(schedule.starts(7)) == 7
    seeds = {schedule.seed(e) for e in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**64 for s in seeds)
    assert schedule.seed(5) == GaugeSchedule(SECRET, 60.0).seed(5)  # depends on secret, epoch
    assert schedule.seed(5) != GaugeSchedule(bytes(32), 3600.0).seed(5)
    assert schedule.gauge_id(5) != f"{schedule.seed(5):x}" and len(schedule.gauge_id(5)) == 32


@pytest.mark.parametrize(
    ("args", "match"),
    [((b"short", 60.0), "secret"), ((SECRET, 0.0), "period"), ((SECRET, float("nan")), "period")],
)
def test_schedule_rejects_bad_settings(args: tuple, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        GaugeSchedule(*args)


def test_schedule_rejects_times_before_origin() -> None:
    schedule = GaugeSchedule(SECRET, 60.0, origin=100.0)
    with pytest.raises(ConfigError):
        schedule.epoch(99.0)
    with pytest.raises(ConfigError):
        schedule.seed(-1)


def record(epoch: int, at: float) -> GaugeRecord:
    return GaugeRecord(epoch, f"id{epoch}", f"sha{epoch}", at)


def test_audit_records_and_answers_which_gauge_served(tmp_path: Path) -> None:
    audit = GaugeAudit(tmp_path / "gauges.jsonl")
    assert audit.records() == [] and audit.latest() is None and audit.serving_at(5.0) is None
    for epoch, at in [(0, 10.0), (1, 20.0), (3, 40.0)]:
        audit.record(record(epoch, at))
    reopened = GaugeAudit(tmp_path / "gauges.jsonl")
    assert [r.epoch for r in reopened.records()] == [0, 1, 3]
    assert reopened.serving_at(9.9) is None
    assert reopened.serving_at(10.0).epoch == 0
    assert reopened.serving_at(39.0).epoch == 1
    assert reopened.serving_at(1e9).epoch == 3
    with pytest.raises(ConfigError, match="does not follow"):
        reopened.record(record(3, 50.0))
    with pytest.raises(ConfigError, match="does not follow"):
        reopened.record(record(4, 30.0))


def test_audit_survives_a_torn_append(tmp_path: Path) -> None:
    path = tmp_path / "gauges.jsonl"
    audit = GaugeAudit(path)
    audit.record(record(0, 1.0))
    with path.open("ab") as f:  # a crash halfway through the next append
        f.write(b'{"epoch": 1, "gauge_id": "id1", "weig')
    assert [r.epoch for r in audit.records()] == [0]
    audit.record(record(1, 2.0))
    assert [r.epoch for r in GaugeAudit(path).records()] == [0, 1]
    assert path.read_bytes().count(b"\n") == 2


def test_audit_refuses_corrupt_files_and_missing_dirs(tmp_path: Path) -> None:
    path = tmp_path / "gauges.jsonl"
    path.write_bytes(b"not json\n")
    with pytest.raises(ConfigError, match="corrupt"):
        GaugeAudit(path).records()
    with pytest.raises(ConfigError, match="does not exist"):
        GaugeAudit(tmp_path / "missing" / "gauges.jsonl")


# --- the matching attacks ---------------------------------------------------------------------


def test_matching_attacks_undo_exact_gauges(strong: PreTrainedModel) -> None:
    """Two gauges of the tiny model: neurons and residual dims are recovered from weights alone."""
    ga, gb = random_gauge(strong.config, 1), random_gauge(strong.config, 2)
    a, b = gauged(strong, 1), gauged(strong, 2)
    gate_a = a.model.layers[0].mlp.gate_proj.weight.detach().numpy()
    gate_b = b.model.layers[0].mlp.gate_proj.weight.detach().numpy()
    truth = attack.true_mapping(ga.layers[0].mlp_perm, gb.layers[0].mlp_perm)
    fa, fb = attack.sorted_abs_rows(gate_a), attack.sorted_abs_rows(gate_b)
    assert attack.recovery(attack.match_exact(fa, fb), truth) == 1.0
    assert attack.recovery(attack.match_nearest(fa, fb), truth) == 1.0
    assert attack.recovery(attack.match_by_norm(gate_a, gate_b), truth) > 0.9
    noisy = gate_b + np.random.default_rng(0).normal(0, 0.01 * gate_b.std(), gate_b.shape)
    assert attack.recovery(attack.match_exact(fa, attack.sorted_abs_rows(noisy)), truth) == 0.0
    assert attack.recovery(attack.match_nearest(fa, attack.sorted_abs_rows(noisy)), truth) > 0.9
    # Residual dims from one layer seen in both gauges: the gate's columns.
    residual_truth = attack.true_mapping(ga.residual.index, gb.residual.index)
    columns = attack.match_exact(attack.sorted_abs_rows(gate_a.T), attack.sorted_abs_rows(gate_b.T))
    assert attack.recovery(columns, residual_truth) == 1.0


def test_residual_features_match_a_layer_to_itself(strong: PreTrainedModel) -> None:
    """Across gauges the features of one layer are equal up to order, so assignment is exact;
    across layers (the real attack, docs/gauge.md) it can only be as good as layers correlate."""
    ga, gb = random_gauge(strong.config, 1), random_gauge(strong.config, 2)

    def features(model: PreTrainedModel) -> np.ndarray:
        prefix = "model.layers.1."
        weights = {
            name.removeprefix(prefix): p.detach().numpy()
            for name, p in model.named_parameters()
            if name.startswith(prefix) and not name.endswith(".bias")
        }
        return attack.residual_features(weights)

    mapping = attack.match_assignment(features(gauged(strong, 1)), features(gauged(strong, 2)))
    truth = attack.true_mapping(ga.residual.index, gb.residual.index)
    assert sorted(mapping) == list(range(strong.config.hidden_size))
    assert attack.recovery(mapping, truth) == 1.0
    with pytest.raises(ConfigError, match="needs"):
        attack.residual_features({})
