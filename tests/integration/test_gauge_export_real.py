"""A gauged llama.cpp serving copy of the real strong model (Qwen2.5-Coder-1.5B Q4_K_M -> F16).

Writes an ungauged and a gauged F16 copy (2 x 3.6 GB, ~1-2 min each) and runs both in llama.cpp
on two chats: the only difference between them is the gauge. The numbers print as one JSON
line (`pytest -s`); docs/gauge.md quotes scripts/measure_gauged_gguf.py, which measures more.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from support.marks import slow
from uplimit.gauge.export import export_gguf, gauge_gguf
from uplimit.gauge.verify import DEFAULT_CHATS
from uplimit.models import store
from uplimit.models.llama import LlamaModel

pytestmark = [
    pytest.mark.real,
    slow("writes two 3.6 GB F16 copies of the 1.5B model (minutes)"),
]

ANSWER = 16
# Summation order plus F16 rounding where llama.cpp rounds (KV cache, matmul inputs); far below
# what a change of weights does (the tiny weak model, 1.5 % noise: logits move by tens).
MAX_LOGIT_DIFF = 0.1  # measured: 0.016 on 4 chats x 16 tokens (docs/gauge.md)


def greedy_then_forced(plain: Path, gauged: Path) -> tuple[float, int, int]:
    """Greedy answers from `plain`; `gauged` fed the same tokens one per call. Returns
    (max |logit diff|, positions where gauged's argmax is plain's token, positions)."""
    worst, agree, total = 0.0, 0, 0
    runs = {}
    for name, path in (("plain", plain), ("gauged", gauged)):
        model = LlamaModel(path, n_threads=2)
        rows_of = []
        with model.session(1, 1024) as s:
            for i, chat in enumerate(DEFAULT_CHATS[:2]):
                seq, row = s.prefill(model.chat_tokens(chat))
                rows = [row.copy()]
                for j in range(ANSWER - 1):
                    token = int(np.argmax(rows[-1])) if name == "plain" else runs["plain"][i][1][j]
                    rows.append(s.step({seq: token})[seq].copy())
                s.drop(seq)
                rows_of.append((np.stack(rows), [int(np.argmax(r)) for r in rows]))
        model.close()
        runs[name] = rows_of
    for (pl, ptoks), (gl, gtoks) in zip(runs["plain"], runs["gauged"], strict=True):
        worst = max(worst, float(np.abs(pl - gl).max()))
        agree += sum(a == b for a, b in zip(ptoks, gtoks, strict=True))
        total += len(ptoks)
    return worst, agree, total


def test_gauged_serving_copy_of_the_real_model(tmp_path: Path, missing) -> None:
    if not store.status(store.STRONG).verified:
        missing("real", "the strong model is not fetched (uplimit models fetch)")
    source = store.model_path(store.STRONG)
    plain = export_gguf(source, tmp_path / "plain.gguf", None)
    gauged = gauge_gguf(source, tmp_path / "gauged.gguf", 1)
    worst, agree, total = greedy_then_forced(plain.path, gauged.path)
    print(json.dumps({"export_s": [plain.seconds, gauged.seconds], "max_abs_logit_diff": worst,
                      "greedy_agreement": f"{agree}/{total}"}))  # fmt: skip
    assert worst < MAX_LOGIT_DIFF
    assert agree == total
