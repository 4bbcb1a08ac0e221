"""Measure a gauged llama.cpp serving copy of a GGUF model (numbers in docs/gauge.md).

    nice -n 10 .venv/bin/python scripts/measure_gauged_gguf.py MODEL.gguf WORKDIR \
        [--dtype f16] [--prompts 8] [--tokens 32] [--threads 1] [--reuse]

1. The fraction of MODEL's matrix values that `dtype` holds exactly.
2. Writes WORKDIR/plain.gguf (same format, no gauge) and WORKDIR/gauged.gguf (seed 1); sizes
   and export times (--reuse keeps the copies of an earlier run).
3. Exactness, llama.cpp: greedy answers of plain on the first --prompts of verify's chats,
   then gauged fed the same tokens one per call: max |logit diff| and how often gauged's argmax
   is plain's token; and whether gauged's own greedy answers are plain's. Also MODEL against
   plain at the first answer position (later positions follow different tokens).
4. Speed: load time of each file, then decode tokens/s of MODEL, plain and gauged measured in
   alternating bursts, so that load from other jobs on the machine falls on all three alike.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from gguf import GGUFReader

from uplimit.gauge.export import DTYPES, export_gguf, gauge_gguf
from uplimit.gauge.verify import DEFAULT_CHATS
from uplimit.models.gguf_write import dequantized
from uplimit.models.llama import LlamaModel

BURST = 8  # decode steps per model per round of the speed test
ROUNDS = 6


def exact_fraction(path: Path, dtype: str) -> float:
    """Fraction of the matrices' values that survive a round trip through `dtype`."""
    np_type = {"f16": np.float16, "f32": np.float32}[dtype]
    same = total = 0
    for t in GGUFReader(path).tensors:
        if len(t.shape) > 1:
            x = dequantized(t)
            same += int(np.count_nonzero(x.astype(np_type).astype(np.float32) == x))
            total += x.size
    return same / total


def answer(
    model: LlamaModel, prompts: list[list[int]], tokens: int, forced: list[list[int]] | None
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Per prompt: the argmax at each answer position, and the logits there. The tokens fed
    are the model's own argmax, or `forced`'s; one token per call."""
    answers, logits = [], []
    with model.session(1, 1024) as s:
        for i, prompt in enumerate(prompts):
            seq, row = s.prefill(prompt)
            rows = [row.copy()]
            for j in range(tokens - 1):
                token = int(np.argmax(rows[-1])) if forced is None else forced[i][j]
                rows.append(s.step({seq: token})[seq].copy())
            s.drop(seq)
            answers.append([int(np.argmax(r)) for r in rows])
            logits.append(np.stack(rows))
    return answers, logits


def speed(models: dict[str, LlamaModel], prompt: list[int]) -> dict[str, float]:
    """Greedy decode tokens/s of each model, in alternating bursts of BURST steps."""
    sessions = {name: m.session(1, 1024) for name, m in models.items()}
    state = {}
    for name, s in sessions.items():
        seq, row = s.prefill(prompt)
        state[name] = (seq, row)
    spent = dict.fromkeys(models, 0.0)
    for _ in range(ROUNDS):
        for name, s in sessions.items():
            seq, row = state[name]
            t0 = time.perf_counter()
            for _ in range(BURST):
                row = s.step({seq: int(np.argmax(row))})[seq]
            spent[name] += time.perf_counter() - t0
            state[name] = (seq, row.copy())
    for s in sessions.values():
        s.close()
    return {name: ROUNDS * BURST / t for name, t in spent.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", type=Path)
    ap.add_argument("workdir", type=Path)
    ap.add_argument("--dtype", default="f16", choices=sorted(DTYPES))
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reuse", action="store_true", help="keep WORKDIR's copies (no export)")
    args = ap.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    report: dict[str, object] = {"dtype": args.dtype}

    def emit() -> None:
        print(json.dumps(report), flush=True)

    plain, gauged = args.workdir / "plain.gguf", args.workdir / "gauged.gguf"
    if not args.reuse:
        report["exact_fraction"] = exact_fraction(args.model, args.dtype)
        done = [
            export_gguf(args.model, plain, None, dtype=args.dtype),
            gauge_gguf(args.model, gauged, 1, dtype=args.dtype),
        ]
        report["export_s"] = [d.seconds for d in done]
    report["bytes"] = {p.name: p.stat().st_size for p in (args.model, plain, gauged)}
    emit()

    models, load_s = {}, {}
    for name, path in (("original", args.model), ("plain", plain), ("gauged", gauged)):
        t0 = time.perf_counter()
        models[name] = LlamaModel(path, n_threads=args.threads)
        load_s[name] = time.perf_counter() - t0
    report["load_s"] = load_s
    prompts = [models["plain"].chat_tokens(c) for c in DEFAULT_CHATS[: args.prompts]]

    ref, ref_logits = answer(models["plain"], prompts, args.tokens, None)
    got, got_logits = answer(models["gauged"], prompts, args.tokens, ref)
    own, _ = answer(models["gauged"], prompts, args.tokens, None)
    orig, orig_logits = answer(models["original"], prompts, args.tokens, None)
    pairs = list(zip(ref_logits, got_logits, strict=True))
    first = [np.abs(a[0] - b[0]).max() for a, b in zip(ref_logits, orig_logits, strict=True)]
    agree = sum(int(np.sum(np.array(r) == np.array(g))) for r, g in zip(ref, got, strict=True))
    n = len(prompts)
    report["gauged_vs_plain"] = {
        "max_abs_logit_diff": float(max(np.abs(a - b).max() for a, b in pairs)),
        "logit_scale": float(max(np.abs(a).max() for a in ref_logits)),
        "argmax_agreement": f"{agree}/{n * args.tokens}",
        "same_greedy_answers": f"{sum(a == b for a, b in zip(ref, own, strict=True))}/{n}",
    }
    report["plain_vs_original"] = {
        "max_abs_logit_diff_first_position": float(max(first)),
        "same_greedy_answers": f"{sum(a == b for a, b in zip(ref, orig, strict=True))}/{n}",
    }
    emit()
    report["tokens_per_s"] = speed(models, prompts[0])
    emit()
    for m in models.values():
        m.close()


if __name__ == "__main__":
    main()
