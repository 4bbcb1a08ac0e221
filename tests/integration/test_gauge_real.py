"""Gauges on the real strong model (Qwen2.5-Coder-1.5B, GGUF dequantized to fp32 by transformers).

One load (~6 GB, 30-80 s), measured once per run: the model is traced on 8 chats, gauge A is
applied in place and checked, a copy of some of its weights is kept, gauge B is applied on top
(as a schedule does) and checked, then the matching attacks try to line up A's copy with B.
The numbers print as one JSON line (`pytest -s`); docs/gauge.md quotes a run.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

from support.marks import slow
from uplimit.gauge import attack
from uplimit.gauge.transform import Dims, apply_gauge, gauge_bits, random_gauge
from uplimit.gauge.verify import DEFAULT_CHATS, DEFAULT_TOLERANCE, compare_to, trace
from uplimit.models import store

pytestmark = [
    pytest.mark.real,
    slow("dequantizes the 1.5B model to fp32 (6 GB, minutes)"),
]

ATTACKED_LAYERS = (0, 13, 27)  # first, middle, last: full MLP matching attacks on these
NOISE = (0.01, 0.1)  # relative noise (x weight std) for the "what if the gauge were noisy" test
ANCHOR_ROWS = (1, 2, 4, 8, 16)  # embedding rows an attacker uploads in both gauges as an anchor
N_TRAINED_TOKENS = 151_643  # ids below this have trained embedding rows
PREFIX = "model.layers.{}."


def layer_weights(model: torch.nn.Module, layer: int) -> dict[str, np.ndarray]:
    prefix = PREFIX.format(layer)
    return {
        name.removeprefix(prefix): param.detach().numpy().copy()
        for name, param in model.named_parameters()
        if name.startswith(prefix) and not name.endswith(".bias")
    }


@pytest.fixture(scope="module")
def measured(missing) -> dict:
    from uplimit.models.hf import HFModel

    if not store.status(store.STRONG).verified:
        missing("real", "the strong model is not fetched (uplimit models fetch)")
    path = store.model_path(store.STRONG)
    started = time.perf_counter()
    hf = HFModel(path, tokenizer_dir=store.uplimit_home() / "tokenizers" / "strong-hf")
    model = hf.torch_model
    dims = Dims.of(model.config)
    out: dict = {"load_s": time.perf_counter() - started, "dims": dims.__dict__}
    out["tied_embeddings"] = model.lm_head.weight is model.model.embed_tokens.weight

    reference = trace(hf, DEFAULT_CHATS, answer_tokens=16)
    gauge_a, gauge_b = random_gauge(model.config, 1), random_gauge(model.config, 2)
    started = time.perf_counter()
    apply_gauge(model, gauge_a)
    out["apply_s"] = time.perf_counter() - started
    out["verify_a"] = compare_to(reference, hf).__dict__
    kept = {layer: layer_weights(model, layer) for layer in ATTACKED_LAYERS}
    anchor = np.random.default_rng(0).choice(N_TRAINED_TOKENS, max(ANCHOR_ROWS), replace=False)
    anchor_a = model.model.embed_tokens.weight[anchor].detach().numpy().copy()
    features_a = [attack.residual_features(layer_weights(model, i)) for i in range(dims.n_layers)]

    apply_gauge(model, gauge_b)  # on top of A: the relative gauge from A to B is gauge_b
    out["verify_ab"] = compare_to(reference, hf).__dict__
    out["gauge_bits"] = gauge_bits(dims)

    identity = np.arange(dims.intermediate)
    out["mlp"] = {}
    for layer in ATTACKED_LAYERS:
        truth = attack.true_mapping(identity, gauge_b.layers[layer].mlp_perm)
        gate_a = kept[layer]["mlp.gate_proj.weight"]
        gate_b = model.model.layers[layer].mlp.gate_proj.weight.detach().numpy()
        started = time.perf_counter()
        fa, fb = attack.sorted_abs_rows(gate_a), attack.sorted_abs_rows(gate_b)
        exact = attack.recovery(attack.match_exact(fa, fb), truth)
        exact_s = time.perf_counter() - started
        result = {
            "exact": exact,
            "exact_s": exact_s,
            "by_norm": attack.recovery(attack.match_by_norm(gate_a, gate_b), truth),
            "nearest": attack.recovery(attack.match_nearest(fa, fb), truth),
        }
        rng = np.random.default_rng(layer)
        for noise in NOISE:
            noisy = gate_b + rng.normal(0, noise * gate_b.std(), gate_b.shape).astype(np.float32)
            noisy_fp = attack.sorted_abs_rows(noisy)
            result[f"nearest_noise_{noise}"] = attack.recovery(
                attack.match_nearest(fa, noisy_fp), truth
            )
        residual_truth = attack.true_mapping(np.arange(dims.hidden), gauge_b.residual.index)
        columns_a, columns_b = attack.sorted_abs_rows(gate_a.T), attack.sorted_abs_rows(gate_b.T)
        columns = attack.match_exact(columns_a, columns_b)
        result["residual_from_shared_layer"] = attack.recovery(columns, residual_truth)
        out["mlp"][layer] = result

    # Residual dims from a few embedding rows held in both gauges (rows are token ids: no gauge).
    residual_truth = attack.true_mapping(np.arange(dims.hidden), gauge_b.residual.index)
    anchor_b = model.model.embed_tokens.weight[anchor].detach().numpy()
    out["residual_from_anchor_rows"] = {
        k: attack.recovery(
            attack.match_exact(np.abs(anchor_a[:k].T).copy(), np.abs(anchor_b[:k].T).copy()),
            residual_truth,
        )
        for k in ANCHOR_ROWS
    }

    # No layer seen twice: A holds layers < L, B holds layers >= L; match L-1 (A) to L (B).
    features_b = [attack.residual_features(layer_weights(model, i)) for i in range(dims.n_layers)]
    cross = [
        attack.recovery(attack.match_assignment(features_a[i - 1], features_b[i]), residual_truth)
        for i in range(1, dims.n_layers)
    ]
    out["residual_cross_layer"] = {
        "mean": float(np.mean(cross)),
        "min": float(np.min(cross)),
        "max": float(np.max(cross)),
        "per_boundary": [round(c, 4) for c in cross],
    }
    hf.close()
    print(json.dumps(out, default=float))
    return out


def test_gauges_keep_the_function(measured: dict) -> None:
    for key in ("verify_a", "verify_ab"):
        report = measured[key]
        assert report["max_abs_diff"] <= DEFAULT_TOLERANCE, report
        assert report["same_answers"] == report["prompts"], report


def test_exact_gauges_are_undone_by_matching(measured: dict) -> None:
    """The honest finding: from the weights alone, exact gauges are recovered completely."""
    for layer, result in measured["mlp"].items():
        assert result["exact"] == 1.0, (layer, result)
        assert result["residual_from_shared_layer"] == 1.0, (layer, result)
    assert measured["residual_from_anchor_rows"][max(ANCHOR_ROWS)] == 1.0
