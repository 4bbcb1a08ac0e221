"""Logits -> frequency tables: exact, layout-independent, close to softmax, strictly validated."""

from __future__ import annotations

import hashlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from uplimit.coding.arith import ArithmeticDecoder, ArithmeticEncoder
from uplimit.coding.freqs import EXP2_TABLE, FRACTION_BITS, LOG2E, FrequencyTable
from uplimit.errors import CodecError

VOCAB = 151936  # Qwen2.5's vocabulary


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max())
    return e / e.sum()


def test_exp2_table_is_pinned() -> None:
    """Both sides must hold this exact table: a change here breaks every stored message."""
    digest = hashlib.sha256(EXP2_TABLE.astype("<i8").tobytes()).hexdigest()
    assert digest == "b8ac697007f4aa90e8156a53c33aefa77c86f751c033192c3f28fcd076c995f8"
    exact = 2.0**30 * 2.0 ** (-np.arange(1 << FRACTION_BITS) / (1 << FRACTION_BITS))
    assert np.abs(EXP2_TABLE - exact).max() <= 0.5 + 1e-6  # rounded to nearest
    assert EXP2_TABLE[0] == 2**30 and np.all(np.diff(EXP2_TABLE) < 0)


def test_log2e_is_the_nearest_double() -> None:
    assert LOG2E.hex() == "0x1.71547652b82fep+0"
    assert abs(LOG2E - 1 / math.log(2)) <= 2**-52


def test_pinned_tables() -> None:
    """Any change to the float step, the rounding or the count formula shows up here."""
    logits = np.array([0.0, -1.0, 2.5, -np.inf, 1e-3, 2.5, -30.0], dtype=np.float32)
    table = FrequencyTable.from_logits(logits)
    assert table.counts.tolist() == [80330551, 29553353, 978593792, 1, 80412156, 978593792, 1]
    assert table.total == 2147483646
    mask = np.array([0, 0, 1, 0, 0, 0, 0], dtype=bool)
    table = FrequencyTable.from_logits(logits, inv_temperature=0.7, mask=mask, total_bits=16)
    assert table.counts.tolist() == [7942, 3944, 0, 1, 7947, 45699, 1]
    assert table.total == 65534


def test_table_depends_on_values_not_on_dtype_or_layout() -> None:
    rng = np.random.default_rng(0)
    base = (rng.standard_normal(2 * 5000) * 4).astype(np.float32)
    strided = base[::2]  # a non-contiguous view
    reference = FrequencyTable.from_logits(np.ascontiguousarray(strided))
    variants = [
        strided,
        strided.astype(np.float64),
        strided.astype(">f4"),  # big-endian
        strided.astype(np.float64)[::-1][::-1],  # negative strides
    ]
    for logits in variants:
        table = FrequencyTable.from_logits(logits)
        assert np.array_equal(table.counts, reference.counts) and table.total == reference.total
    halves = strided.astype(np.float16)  # float16 values are exact in float32 and float64
    assert np.array_equal(
        FrequencyTable.from_logits(halves).counts,
        FrequencyTable.from_logits(halves.astype(np.float32)).counts,
    )


def test_input_is_not_modified() -> None:
    logits = np.array([1.0, 2.0, np.nan], dtype=np.float64)
    mask = np.array([False, False, True])
    FrequencyTable.from_logits(logits, mask=mask)
    assert logits[:2].tolist() == [1.0, 2.0] and np.isnan(logits[2])


logit_arrays = hnp.arrays(
    np.float32,
    st.integers(1, 60),
    elements=st.one_of(
        st.floats(-1e4, 1e4, width=32), st.sampled_from([-np.inf, 0.0, -0.0, 1e-30, 88.0])
    ),
)


@settings(max_examples=120, deadline=None)
@given(logit_arrays, st.data())
def test_counts_are_a_valid_monotone_table(logits: np.ndarray, data: st.DataObject) -> None:
    mask = data.draw(hnp.arrays(np.bool_, logits.shape))
    if mask.all():
        mask[data.draw(st.integers(0, mask.size - 1))] = False
    inv_t = data.draw(st.sampled_from([1.0, 0.25, 0.7, 3.0]))
    total_bits = data.draw(st.sampled_from([31, 32, 16, 8]))
    table = FrequencyTable.from_logits(
        logits, inv_temperature=inv_t, mask=mask, total_bits=total_bits
    )
    counts = table.counts
    n_codable = int((~mask).sum())
    assert np.all(counts[mask] == 0) and np.all(counts[~mask] >= 1)
    assert table.total == counts.sum() and 2**total_bits - n_codable < table.total <= 2**total_bits
    # Higher logit -> no fewer counts, among the codable symbols.
    order = np.argsort(logits[~mask], kind="stable")
    assert np.all(np.diff(counts[~mask][order]) >= 0)
    assert np.array_equal(table.cumulative, np.concatenate([[0], np.cumsum(counts)]))
    for s in np.flatnonzero(~mask):
        low, freq = table.interval(int(s))
        assert (low, freq) == (table.cumulative[s], counts[s])
        assert table.symbol_at(low) == s and table.symbol_at(low + freq - 1) == s
    again = FrequencyTable.from_logits(
        logits.copy(), inv_temperature=inv_t, mask=mask.copy(), total_bits=total_bits
    )
    assert np.array_equal(again.counts, counts)


def test_near_certain_token_costs_almost_nothing_on_a_152k_vocabulary() -> None:
    logits = np.full(VOCAB, -20.0, dtype=np.float32)
    logits[151645] = 20.0  # p(others) ~ 151935 * e**-40: the true probability is ~1
    table = FrequencyTable.from_logits(logits)
    assert table.cost_bits(151645) < 0.001
    assert table.cost_bits(151645) == pytest.approx(-math.log2(1 - VOCAB / 2**31), rel=1e-3)


def test_probabilities_follow_softmax() -> None:
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(VOCAB) * 3).astype(np.float32)
    logits[:10] += 25  # a few likely tokens, as after a confident prefix
    for inv_t in (1.0, 0.5):
        table = FrequencyTable.from_logits(logits, inv_temperature=inv_t)
        p = softmax(logits.astype(np.float64) * inv_t)
        q = table.counts / table.total
        big = p > 1e-4
        assert np.abs(q[big] / p[big] - 1).max() < 2e-4  # the docstring promises < 0.02 %
        kl_bits = float(np.sum(p * np.log2(p / q)))
        assert kl_bits < 1e-3  # what exactness costs per token, on average


def test_inv_temperature_equals_scaling_the_logits_by_a_power_of_two() -> None:
    """Power-of-two scalings commute with the rounding, so these tables are identical."""
    logits = (np.random.default_rng(2).standard_normal(1000) * 5).astype(np.float64)
    for factor in (2.0, 0.5, 0.125):
        a = FrequencyTable.from_logits(logits, inv_temperature=factor)
        b = FrequencyTable.from_logits(logits * factor)
        assert np.array_equal(a.counts, b.counts)


def test_temperature_sharpens_and_flattens() -> None:
    logits = np.array([3.0, 1.0, 0.0, -2.0], dtype=np.float32)
    probs = [
        FrequencyTable.from_logits(logits, inv_temperature=t).probability(0)
        for t in (0.1, 0.5, 1.0, 2.0, 10.0)
    ]
    assert probs == sorted(probs) and probs[0] < 0.35 and probs[-1] > 0.999


def test_all_minus_inf_is_uniform_and_minus_inf_stays_codable() -> None:
    table = FrequencyTable.from_logits(np.full(4, -np.inf))
    assert table.counts.tolist() == [2**29] * 4
    table = FrequencyTable.from_logits(np.array([0.0, -np.inf]))
    assert table.counts[1] == 1


def test_masked_symbols_cannot_be_coded_or_decoded() -> None:
    logits = np.linspace(-5, 5, 3 * 4096 + 17)  # several of symbol_at's blocks
    mask = np.zeros(logits.size, dtype=bool)
    mask[[0, 4095, 4096, 5000, logits.size - 1]] = True
    mask[6000:9000] = True
    logits[mask] = np.nan  # masked values are ignored
    table = FrequencyTable.from_logits(logits, mask=mask)
    with pytest.raises(CodecError, match="masked"):
        table.interval(5000)
    assert table.probability(5000) == 0.0 and table.cost_bits(5000) == math.inf
    targets = np.random.default_rng(3).integers(0, table.total, 500).tolist()
    targets += [0, table.total - 1, *table.cumulative[table.cumulative < table.total].tolist()]
    for target in targets:
        s = table.symbol_at(target)
        assert not mask[s] and table.cumulative[s] <= target < table.cumulative[s + 1]


def test_tables_drive_the_coder_on_a_152k_vocabulary() -> None:
    rng = np.random.default_rng(4)
    steps = []
    for _ in range(8):
        logits = (rng.standard_normal(VOCAB) * 2).astype(np.float32)
        logits[rng.integers(VOCAB)] += 15
        mask = rng.random(VOCAB) < 0.01
        table = FrequencyTable.from_logits(logits, mask=mask)
        steps.append((logits, mask, int(rng.choice(VOCAB, p=table.counts / table.total))))
    enc = ArithmeticEncoder()
    for logits, mask, token in steps:
        table = FrequencyTable.from_logits(logits, mask=mask)
        enc.encode(*table.interval(token), table.total)
    dec = ArithmeticDecoder(enc.finish())
    for logits, mask, token in steps:
        table = FrequencyTable.from_logits(logits, mask=mask)  # rebuilt, as the decoder does
        got = table.symbol_at(dec.decode_target(table.total))
        dec.consume(*table.interval(got), table.total)
        assert got == token
    dec.finish()


@pytest.mark.parametrize(
    ("logits", "kwargs"),
    [
        (np.zeros((2, 3), dtype=np.float32), {}),
        (np.zeros(0, dtype=np.float32), {}),
        (np.zeros(3, dtype=np.int64), {}),
        (np.zeros(3, dtype=np.longdouble), {}),
        ([0.0, 1.0], {}),  # a list holds Python floats: accepted as float64
        (np.array([0.0, np.nan]), {}),
        (np.array([0.0, np.inf]), {}),
        (np.zeros(3), {"mask": np.ones(3, dtype=bool)}),
        (np.zeros(3), {"mask": np.zeros(4, dtype=bool)}),
        (np.zeros(3), {"mask": np.zeros(3, dtype=np.int8)}),
        (np.zeros(3), {"inv_temperature": 0.0}),
        (np.zeros(3), {"inv_temperature": -1.0}),
        (np.zeros(3), {"inv_temperature": math.nan}),
        (np.zeros(3), {"inv_temperature": math.inf}),
        (np.zeros(3), {"inv_temperature": 1e307}),  # the scale would overflow
        (np.zeros(3), {"inv_temperature": "1"}),
        (np.zeros(3), {"total_bits": 0}),
        (np.zeros(3), {"total_bits": 33}),
        (np.zeros(3), {"total_bits": 31.0}),
        (np.zeros(5), {"total_bits": 2}),  # 5 symbols cannot each get a count of 4
    ],
)
def test_bad_input_raises(logits: object, kwargs: dict) -> None:
    if isinstance(logits, list):
        FrequencyTable.from_logits(np.asarray(logits), **kwargs)
        return
    with pytest.raises(CodecError):
        FrequencyTable.from_logits(logits, **kwargs)  # type: ignore[arg-type]


def test_direct_construction_is_validated_and_immutable() -> None:
    counts = np.array([1, 0, 5], dtype=np.int64)
    table = FrequencyTable(counts, 6)
    counts[0] = 100  # the table holds its own copy
    assert table.counts.tolist() == [1, 0, 5] and not table.counts.flags.writeable
    assert table.interval(2) == (1, 5) and table.symbol_at(0) == 0 and table.symbol_at(1) == 2
    for bad_counts, total in [
        (np.array([1, 2], dtype=np.int64), 4),
        (np.array([-1, 2], dtype=np.int64), 1),
        (np.array([0, 0], dtype=np.int64), 0),
        (np.array([1.0, 2.0]), 3),
        (np.array([2**62, 2**62, -(2**62)], dtype=np.int64), 2**62),  # sum would wrap
        (np.array([2**32, 1], dtype=np.int64), 2**32 + 1),
    ]:
        with pytest.raises(CodecError):
            FrequencyTable(bad_counts, total)
    for method, arg in [("interval", 3), ("symbol_at", 6), ("symbol_at", -1), ("cost_bits", -1)]:
        with pytest.raises(CodecError):
            getattr(table, method)(arg)
