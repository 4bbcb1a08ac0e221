"""The obvious attacks on gauges: match units between two copies of the weights in different gauges.

An attacker who copied part of the weights in gauge A and the rest in gauge B must learn how A's
units correspond to B's before the parts fit together. These functions try it from the weights
alone, no seeds, and `recovery` scores a guess against the truth (which only the defender knows).

- MLP neurons: a neuron's gate row, as a multiset of absolute values, does not change under a
  residual signed permutation, and gate rows carry no neuron sign; so `sorted_abs_rows(gate)`
  fingerprints each neuron. `match_exact` pairs equal fingerprints (exact gauges keep values
  bit-for-bit), `match_nearest` the closest ones (survives noise), `match_by_norm` pairs by rank
  of the row norm (cheapest).
- Residual dimensions, given one layer seen in both gauges: the columns of its gate projection,
  as multisets of absolute values, fingerprint the dimensions the same way.
- Residual dimensions with no layer seen twice (A holds layers < L, B holds layers >= L):
  `residual_features` summarises each dimension by norms that every in-layer gauge leaves alone,
  and `match_assignment` pairs layer L-1's dimensions with layer L's (Hungarian assignment).

All take numpy arrays (float32); convert tensors with `.numpy()`. docs/gauge.md has the results
on Qwen2.5-Coder-1.5B.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from uplimit.errors import ConfigError

Matrix = npt.NDArray[np.float32]
UnitMap = npt.NDArray[np.int64]  # mapping[i] = the unit in B matched to unit i of A, -1: none

# Per layer, the weights `residual_features` reads and the axis that is the residual one.
_RESIDUAL_AXIS = {
    "input_layernorm.weight": 0,
    "post_attention_layernorm.weight": 0,
    "self_attn.q_proj.weight": 1,
    "self_attn.k_proj.weight": 1,
    "self_attn.v_proj.weight": 1,
    "self_attn.o_proj.weight": 0,
    "mlp.gate_proj.weight": 1,
    "mlp.up_proj.weight": 1,
    "mlp.down_proj.weight": 0,
}
_CHUNK = 1024  # rows of A per distance block in match_nearest: bounds memory to CHUNK x n_B


def true_mapping(perm_a: npt.NDArray[np.int64], perm_b: npt.NDArray[np.int64]) -> UnitMap:
    """The truth, for gathers from one original order: unit i of A is unit mapping[i] of B."""
    position_in_b = np.argsort(perm_b)
    return position_in_b[perm_a]


def recovery(mapping: UnitMap, truth: UnitMap) -> float:
    """Fraction of units matched correctly."""
    return float(np.mean(mapping == truth))


def sorted_abs_rows(weight: Matrix) -> Matrix:
    """Each row's absolute values, sorted: invariant to signed permutations of the columns."""
    return np.sort(np.abs(weight), axis=1)


def match_exact(fingerprints_a: Matrix, fingerprints_b: Matrix) -> UnitMap:
    """Pair rows with bit-identical fingerprints (the last one wins among duplicates)."""
    index = {row.tobytes(): j for j, row in enumerate(fingerprints_b)}
    return np.array([index.get(row.tobytes(), -1) for row in fingerprints_a], dtype=np.int64)


def match_nearest(fingerprints_a: Matrix, fingerprints_b: Matrix) -> UnitMap:
    """Pair each row of A with the closest row of B (Euclidean); B's rows may repeat."""
    b_sq = np.einsum("ij,ij->i", fingerprints_b, fingerprints_b)
    mapping = np.empty(len(fingerprints_a), dtype=np.int64)
    for start in range(0, len(fingerprints_a), _CHUNK):
        block = fingerprints_a[start : start + _CHUNK]
        # |a - b|^2 minus |a|^2, which does not change the argmin over b.
        distance = b_sq[None, :] - 2.0 * (block @ fingerprints_b.T)
        mapping[start : start + len(block)] = distance.argmin(axis=1)
    return mapping


def match_by_norm(weight_a: Matrix, weight_b: Matrix) -> UnitMap:
    """Pair rows by the rank of their L2 norm."""
    order_a = np.argsort(np.linalg.norm(weight_a, axis=1), kind="stable")
    order_b = np.argsort(np.linalg.norm(weight_b, axis=1), kind="stable")
    mapping = np.empty(len(order_a), dtype=np.int64)
    mapping[order_a] = order_b
    return mapping


def residual_features(layer: Mapping[str, Matrix]) -> Matrix:
    """Per residual dimension of one layer: log of |norm weight| and of the L2 norms of the
    column (projections that read the stream) or row (that write it) each weight gives it.

    Every in-layer gauge part (neurons, heads, signs) leaves these norms alone, and the residual
    relabelling only reorders them. `layer` maps the names in `_RESIDUAL_AXIS` (without the
    `model.layers.<i>.` prefix) to arrays. Returns [hidden, 9], each feature standardised.
    """
    missing = set(_RESIDUAL_AXIS) - set(layer)
    if missing:
        raise ConfigError(f"residual_features needs {sorted(missing)}")
    columns = []
    for name, axis in _RESIDUAL_AXIS.items():
        weight = np.asarray(layer[name], dtype=np.float64)
        size = np.abs(weight) if weight.ndim == 1 else np.linalg.norm(weight, axis=1 - axis)
        columns.append(np.log(size + 1e-12))
    features = np.stack(columns, axis=1)
    return ((features - features.mean(0)) / (features.std(0) + 1e-12)).astype(np.float32)


def match_assignment(features_a: Matrix, features_b: Matrix) -> UnitMap:
    """One-to-one pairing minimising the total squared distance (Hungarian; needs scipy)."""
    from scipy.optimize import linear_sum_assignment

    a = features_a.astype(np.float64)
    b = features_b.astype(np.float64)
    cost = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * (a @ b.T)
    rows, cols = linear_sum_assignment(cost)
    mapping = np.full(len(a), -1, dtype=np.int64)
    mapping[rows] = cols
    return mapping
