"""`uplimit bench`: what the uplink would carry for real prompts, against honest baselines.

Generates with the strong model (all prompts in lock step; with tie_nats or tilt the weak
encoder's model guides it, `coding.generate`), encodes the responses in frames
against one weak-model instance, decodes them with a separately loaded one, checks they are
identical, and compares the frame bits with plain arithmetic coding under the weak model
(the seed post's scheme) and with general-purpose compressors applied to each response on
its own, as a link that must deliver each response promptly would have to.
"""

from __future__ import annotations

import bz2
import gzip
import hashlib
import lzma
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass

import brotli
import zstandard

from uplimit.coding.calibration import Calibration
from uplimit.coding.codec import Prediction, cost_bits, plain_cost_bits
from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.models.base import LanguageModel, Logits, SeqId, Session
from uplimit.progress import Progress
from uplimit.prompts import Prompt
from uplimit.wire.frame import FrameConfig, FrameContent, FrameDecoder, FrameEncoder
from uplimit.wire.streams import StreamSpec, StreamState


@dataclass(frozen=True)
class BenchSettings:
    params: SamplingParams
    max_tokens: int = 128
    frame_tokens: int = 16  # tokens per stream per frame
    seed: int = 0

    def record(self) -> dict:
        """The settings as a result records them (JSON-ready)."""
        return {
            **asdict(self.params),
            "max_tokens": self.max_tokens,
            "frame_tokens": self.frame_tokens,
            "seed": self.seed,
        }


class TimedSession(Session):
    """A session that adds up the time spent inside the model, and can record logits."""

    def __init__(self, inner: Session) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.observe: Callable[[SeqId, Logits], None] | None = None

    def prefill(self, prompt: Sequence[int]) -> tuple[SeqId, Logits]:
        t0 = time.perf_counter()
        seq, logits = self.inner.prefill(prompt)
        self.seconds += time.perf_counter() - t0
        return seq, logits

    def step(self, tokens: Mapping[SeqId, int]) -> dict[SeqId, Logits]:
        t0 = time.perf_counter()
        out = self.inner.step(tokens)
        self.seconds += time.perf_counter() - t0
        return out

    def truncate(self, seq: SeqId, length: int) -> None:
        self.inner.truncate(seq, length)

    def drop(self, seq: SeqId) -> None:
        self.inner.drop(seq)

    def length(self, seq: SeqId) -> int:
        return self.inner.length(seq)

    def close(self) -> None:
        self.inner.close()


def stream_seed(base: int, prompt_id: str) -> int:
    """A per-prompt seed, as the outer side would assign one per request."""
    digest = hashlib.sha256(f"{base}/{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def baselines_bits(texts: Sequence[str], token_ids: Sequence[Sequence[int]], n_vocab: int) -> dict:
    """Total bits of each baseline, every response compressed on its own at maximum level."""
    data = [t.encode() for t in texts]
    zstd = zstandard.ZstdCompressor(level=22)
    return {
        "raw_token_ids": sum(len(ids) for ids in token_ids) * (n_vocab - 1).bit_length(),
        "utf8": 8 * sum(map(len, data)),
        "zlib": 8 * sum(len(zlib.compress(d, 9)) for d in data),
        "bz2": 8 * sum(len(bz2.compress(d, 9)) for d in data),
        "lzma": 8 * sum(len(lzma.compress(d, preset=9 | lzma.PRESET_EXTREME)) for d in data),
        "zstd": 8 * sum(len(zstd.compress(d)) for d in data),
        "brotli": 8 * sum(len(brotli.compress(d, quality=11)) for d in data),
    }


def run_bench(
    prompts: Sequence[Prompt],
    settings: BenchSettings,
    strong: LanguageModel,
    weak_encoder: LanguageModel,
    weak_decoder: LanguageModel,
    calibration: Calibration,
    progress: Progress | None = None,
) -> dict:
    """Run the whole benchmark; returns the JSON-ready result."""
    report = progress or (lambda *_: None)
    params = settings.params
    requests = [
        Request(
            tuple(strong.chat_tokens(p.messages)),
            params,
            stream_seed(settings.seed, p.id),
            settings.max_tokens,
        )
        for p in prompts
    ]
    budget = len(requests) * settings.max_tokens
    # every sequence, strong or weak, holds its prompt and its answer
    context = max(len(r.prompt) for r in requests) + settings.max_tokens + 1
    t0 = time.perf_counter()
    gens, gen_times = generate(
        strong,
        requests,
        max_context=context,
        on_step=lambda n: report("strong model generating", n, budget),
        weak=weak_encoder,  # read only with tie_nats or tilt
    )
    strong_s = time.perf_counter() - t0
    responses = [g.tokens for g in gens]
    n_tokens = sum(map(len, responses))

    specs = [
        StreamSpec(i, r.prompt, r.params, r.seed, r.max_tokens) for i, r in enumerate(requests)
    ]
    contents = _frame_contents(responses, settings.frame_tokens)
    config = FrameConfig(settings.frame_tokens, weak_encoder.info.n_vocab)
    enc_out = _encode(weak_encoder, specs, contents, calibration, config, context, report)
    dec_out = _decode(weak_decoder, specs, enc_out["frames"], calibration, config, context, report)
    decoded = dec_out["tokens"]
    exact = all(decoded.get(i, []) == r for i, r in enumerate(responses))

    frame_bits = 8 * sum(map(len, enc_out["frames"]))
    texts = [strong.detokenize(r) for r in responses]
    base = baselines_bits(texts, responses, strong.info.n_vocab)

    def per_token(bits: float) -> float:
        return bits / n_tokens if n_tokens else 0.0

    return {
        "settings": settings.record(),
        "models": {
            "strong": {"name": strong.info.name, "sha256": strong.info.file_sha256},
            "weak": {"name": weak_encoder.info.name, "sha256": weak_encoder.info.file_sha256},
        },
        "calibration": {"digest": calibration.digest(), "note": calibration.note},
        "responses": len(responses),
        "tokens": n_tokens,
        "frames": len(enc_out["frames"]),
        "bits_per_token": per_token(frame_bits),
        "payload_bits_per_token": per_token(enc_out["token_bits"]),
        "plain_bits_per_token": per_token(enc_out["plain_bits"]),
        "frame_overhead": (frame_bits - enc_out["token_bits"]) / max(enc_out["token_bits"], 1e-9),
        "top1_agreement": enc_out["hits"] / n_tokens if n_tokens else 0.0,
        # tie_nats or tilt: the share of tokens that are not the strong model's own choice
        "steered_share": sum(g.steered for g in gens) / n_tokens if n_tokens else 0.0,
        "baselines_bits_per_token": {k: per_token(v) for k, v in base.items()},
        "exact_roundtrip": exact,
        "mismatches": enc_out["mismatches"] + dec_out["mismatches"],
        "strong_tokens_per_s": n_tokens / strong_s if strong_s else 0.0,
        "strong_model_s": gen_times.model_s,
        "encode_tokens_per_s": n_tokens / enc_out["seconds"] if enc_out["seconds"] else 0.0,
        "decode_tokens_per_s": n_tokens / dec_out["seconds"] if dec_out["seconds"] else 0.0,
        "encode_overhead": enc_out["seconds"] / enc_out["model_s"] - 1,
        "decode_overhead": dec_out["seconds"] / dec_out["model_s"] - 1,
        "per_response": [
            {
                "id": p.id,
                "tokens": len(r),
                "finish_reason": g.finish_reason.openai,
                "payload_bits": enc_out["stream_bits"].get(i, 0.0),
                # frame overhead shared out per token
                "bits": enc_out["stream_bits"].get(i, 0.0)
                + (frame_bits - enc_out["token_bits"]) * len(r) / max(n_tokens, 1),
                "gzip_bits": 8 * len(gzip.compress(t.encode(), 9)),
                "text": t,
            }
            for i, (p, r, t, g) in enumerate(zip(prompts, responses, texts, gens, strict=True))
        ],
    }


def _frame_contents(responses: Sequence[Sequence[int]], per_frame: int) -> list[FrameContent]:
    """Frames as a lock-step server would send them: every stream's next `per_frame` tokens."""
    contents = []
    longest = max(map(len, responses), default=0)
    for start in range(0, longest, per_frame):
        tokens = {
            i: tuple(r[start : start + per_frame])
            for i, r in enumerate(responses)
            if len(r) > start
        }
        contents.append(FrameContent(admitted=len(responses) if start == 0 else 0, tokens=tokens))
    return contents


def _encode(
    weak: LanguageModel,
    specs: Sequence[StreamSpec],
    contents: Sequence[FrameContent],
    calibration: Calibration,
    config: FrameConfig,
    max_context: int,
    report: Progress,
) -> dict:
    costs = _Costs()
    total = sum(len(t) for c in contents for t in c.tokens.values())
    with weak.session(len(specs), max_context) as raw_session:
        session = TimedSession(raw_session)
        encoder = FrameEncoder(session, weak.info.eos_ids, calibration, config)
        encoder.observe = costs
        for spec in specs:
            encoder.add_stream(spec)
        frames, token_bits, hits, done = [], 0.0, 0, 0
        t0 = time.perf_counter()
        for content in contents:
            data, stats = encoder.encode(content)
            frames.append(data)
            token_bits += stats.token_bits
            hits += stats.hits
            done += stats.tokens
            report("encoding", done, total)
        seconds = time.perf_counter() - t0 - costs.seconds
    return {
        "frames": frames,
        "token_bits": token_bits,
        "plain_bits": costs.plain_bits,
        "stream_bits": costs.stream_bits,
        "hits": hits,
        "seconds": seconds,
        "model_s": session.seconds,
        "mismatches": encoder.mismatches,
    }


class _Costs:
    """Frame observer: each stream's coded bits, and its cost under plain weak-model coding."""

    def __init__(self) -> None:
        self.plain_bits = 0.0
        self.stream_bits: dict[int, float] = {}
        self.seconds = 0.0  # spent measuring, not encoding

    def __call__(self, state: StreamState, logits: Logits, pred: Prediction, token: int) -> None:
        t0 = time.perf_counter()
        self.plain_bits += plain_cost_bits(logits, token, state.spec.params)
        sid = state.spec.stream_id
        self.stream_bits[sid] = self.stream_bits.get(sid, 0.0) + cost_bits(pred, token)
        self.seconds += time.perf_counter() - t0


def _decode(
    weak: LanguageModel,
    specs: Sequence[StreamSpec],
    frames: Sequence[bytes],
    calibration: Calibration,
    config: FrameConfig,
    max_context: int,
    report: Progress,
) -> dict:
    tokens: dict[int, list[int]] = {}
    with weak.session(len(specs), max_context) as raw_session:
        session = TimedSession(raw_session)
        decoder = FrameDecoder(session, weak.info.eos_ids, calibration, config)
        for spec in specs:
            decoder.add_stream(spec)
        t0 = time.perf_counter()
        for n, data in enumerate(frames, 1):
            content, _ = decoder.decode(data)
            for s, t in content.tokens.items():
                tokens.setdefault(s, []).extend(t)
            report("decoding", n, len(frames))
        seconds = time.perf_counter() - t0
    return {
        "tokens": tokens,
        "seconds": seconds,
        "model_s": session.seconds,
        "mismatches": decoder.mismatches,
    }


def summary_rows(result: dict) -> list[tuple[str, str]]:
    """The benchmark's headline figures as (label, value) rows for a table."""
    r = result
    counts = f"{r['responses']} / {r['tokens']} / {r['frames']}"
    enc = f"{r['encode_tokens_per_s']:.1f} ({100 * r['encode_overhead']:.1f} %)"
    dec = f"{r['decode_tokens_per_s']:.1f} ({100 * r['decode_overhead']:.1f} %)"
    return [
        ("responses / tokens / frames", counts),
        ("bits/token, all-in (frames)", f"{r['bits_per_token']:.3f}"),
        ("bits/token, token payload", f"{r['payload_bits_per_token']:.3f}"),
        ("bits/token, plain weak coding", f"{r['plain_bits_per_token']:.3f}"),
        ("frame overhead / payload", f"{100 * r['frame_overhead']:.1f} %"),
        ("decoder guess = strong token", f"{100 * r['top1_agreement']:.1f} %"),
        ("tokens steered by tie_nats / tilt", f"{100 * r['steered_share']:.1f} %"),
        ("exact round trip / mismatches", f"{r['exact_roundtrip']} / {r['mismatches']}"),
        *((f"baseline {k}", f"{v:.2f}") for k, v in r["baselines_bits_per_token"].items()),
        ("strong model tokens/s", f"{r['strong_tokens_per_s']:.1f}"),
        ("encode tokens/s (coding overhead)", enc),
        ("decode tokens/s (coding overhead)", dec),
    ]


__all__ = ["BenchSettings", "TimedSession", "baselines_bits", "run_bench", "summary_rows"]
