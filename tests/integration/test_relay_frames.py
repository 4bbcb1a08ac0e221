"""`RelayFrames` in one process (tiny pair): the inner's real link to the relay joined in memory
(`uplimit.both.in_process`), and the outer's decoder reading the relay's frames directly.

More of the outer's streams than the relay's table holds are admitted as room frees up, each
decodes to the strong model's own tokens, and a stream the outer cancels ends explicitly with
a prefix of them, in both release policies. A stream the inner refuses, or the relay cannot
open, is refused to the outer in the frame that admits it, with the reason."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from uplimit.both import in_process
from uplimit.coding.calibration import Calibration
from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.inner.scheduler import SchedulerConfig
from uplimit.inner.service import InnerService
from uplimit.link.budget import Budgets
from uplimit.link.ledger import SqliteLedger
from uplimit.models.base import LanguageModel
from uplimit.outer.service import OuterService
from uplimit.relay.frames import RelayFrames
from uplimit.wire.frame import FrameConfig, FrameDecoder, FrameEncoder, Refusal
from uplimit.wire.request import GenerationRequest
from uplimit.wire.streams import StreamSpec, ends_stream

TABLE = 2  # the relay's and the outer's table: fewer than the streams below
MAX_TOKENS = 12
RELAY_CONTEXT = 256


@dataclass
class Seen:
    """What the outer's decoder got, per stream."""

    tokens: dict[int, list[int]] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    refused: dict[int, Refusal] = field(default_factory=dict)


def _relay(
    strong: LanguageModel,
    weak: LanguageModel,
    tmp_path,
    specs: list[StreamSpec],
    release: str,
    *,
    inner_context: int = 2048,
    cancel: int | None = None,
) -> Seen:
    """Open `specs` as the outer would and decode the relay's frames until each stream ended
    (`cancel`: cancel that stream once its first tokens came)."""
    eos, config = weak.info.eos_ids, FrameConfig(4, weak.info.n_vocab)

    async def main() -> Seen:
        scheduling = SchedulerConfig(max_batch=4, max_streams=8, frame_tokens=4,
                                     max_context=inner_context)  # fmt: skip
        inner = InnerService(strong, weak, Calibration(), scheduling)
        relay_session = weak.session(8, RELAY_CONTEXT + 1)
        decoder = FrameDecoder(relay_session, eos, Calibration(), config)
        ledger = SqliteLedger(tmp_path / "ledger.db", Budgets(1 << 30))
        seen = Seen()
        with weak.session(TABLE, 1024) as up, weak.session(TABLE, 1024) as down:
            encoder = FrameEncoder(up, eos, Calibration(), config)
            outer = FrameDecoder(down, eos, Calibration(), config)
            async with in_process(inner, decoder, weak.info, Calibration(), ledger, tmp_path,
                                  tick_s=0.002) as pair:  # fmt: skip
                service = OuterService(weak, pair.uplink, max_context=RELAY_CONTEXT)
                service.start()
                frames = RelayFrames(service, encoder, asyncio.get_running_loop(), eos_ids=eos,
                                     max_streams=TABLE, release=release)  # fmt: skip
                service.on_stream_end = frames.stream_ended
                for spec in specs:
                    outer.add_stream(spec)
                    extra = GenerationRequest(spec, f"r{spec.stream_id}").extra()
                    await asyncio.to_thread(frames.open_stream, spec, extra)
                    seen.tokens[spec.stream_id] = []
                async with asyncio.timeout(120):
                    while len(seen.done) < len(specs):
                        data = await asyncio.to_thread(frames.next_frame)
                        if data is None:
                            await asyncio.sleep(0.01)
                            continue
                        content, _ = outer.decode(data)
                        seen.refused.update(content.refused)
                        for sid, tokens in content.tokens.items():
                            seen.tokens[sid].extend(tokens)
                        for sid, tokens in seen.tokens.items():
                            if (
                                sid in content.ended
                                or sid in content.refused
                                or ends_stream(tokens, MAX_TOKENS, eos)
                            ):
                                seen.done.add(sid)
                        if cancel is not None and seen.tokens[cancel]:
                            await asyncio.to_thread(frames.cancel, cancel)
                await service.aclose()
            encoder.close()
            outer.close()
        decoder.close()
        relay_session.close()
        return seen

    return asyncio.run(main())


def _specs(prompts: list[tuple[int, ...]]) -> list[StreamSpec]:
    params = SamplingParams(0.7)
    return [StreamSpec(10 + i, p, params, i, MAX_TOKENS) for i, p in enumerate(prompts)]


def _expected(strong: LanguageModel, specs: list[StreamSpec]) -> dict[int, list[int]]:
    requests = [Request(s.prompt, s.params, s.seed, MAX_TOKENS) for s in specs]
    gens, _ = generate(strong, requests)
    return {s.stream_id: gen.tokens for s, gen in zip(specs, gens, strict=True)}


@pytest.mark.parametrize("release", ["stream", "tick"])
def test_streams_queue_for_the_table_decode_exactly_and_a_cancel_ends_one(
    tiny_strong, tiny_weak, tmp_path, release
):
    specs = _specs([tuple(tiny_strong.tokenize("def add(a, b):"))] * 4)
    expected = _expected(tiny_strong, specs)
    cancelled = specs[0].stream_id  # once its first tokens came ("tick"), or at its end
    seen = _relay(tiny_strong, tiny_weak, tmp_path, specs, release, cancel=cancelled)
    assert not seen.refused
    for sid, tokens in seen.tokens.items():
        if sid == cancelled:
            assert tokens and tokens == expected[sid][: len(tokens)]
        else:
            assert tokens == expected[sid], sid


def test_refusals_reach_the_outer_in_the_admitting_frame(tiny_strong, tiny_weak, tmp_path):
    short = tuple(tiny_strong.tokenize("def add(a, b):"))
    words = tuple(tiny_strong.tokenize(" word" * 100))[:100]
    # the inner's context is 64: 100 prompt tokens it refuses; 300 do not fit the relay's 256
    specs = _specs([short, words, words * 3, short])
    seen = _relay(tiny_strong, tiny_weak, tmp_path, specs, "tick", inner_context=64)
    assert seen.refused == {11: Refusal.CONTEXT, 12: Refusal.CONTEXT}
    expected = _expected(tiny_strong, [specs[0], specs[3]])
    assert {sid: seen.tokens[sid] for sid in (10, 13)} == expected
    assert seen.tokens[11] == seen.tokens[12] == []
