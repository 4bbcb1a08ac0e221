"""`RelayFrames` in one process (tiny pair): the inner's real link to the relay joined in memory
(`uplimit.both.in_process`), and the outer's decoder reading the relay's frames directly.

More of the outer's streams than the relay's table holds are admitted as room frees up, each
decodes to the strong model's own tokens, and a stream the outer cancels ends explicitly with
a prefix of them, in both release policies."""

from __future__ import annotations

import asyncio

import pytest

from uplimit.both import in_process
from uplimit.coding.calibration import Calibration
from uplimit.coding.generate import Request, generate
from uplimit.coding.sampling import SamplingParams
from uplimit.inner.scheduler import SchedulerConfig
from uplimit.inner.service import InnerService
from uplimit.link.budget import Budgets
from uplimit.link.ledger import SqliteLedger
from uplimit.outer.service import OuterService
from uplimit.relay.frames import RelayFrames
from uplimit.wire.frame import FrameConfig, FrameDecoder, FrameEncoder
from uplimit.wire.request import GenerationRequest
from uplimit.wire.streams import StreamSpec, ends_stream

TABLE = 2  # the relay's and the outer's table: fewer than the streams below
MAX_TOKENS = 12


@pytest.mark.parametrize("release", ["stream", "tick"])
def test_streams_queue_for_the_table_decode_exactly_and_a_cancel_ends_one(
    tiny_strong, tiny_weak, tmp_path, release
):
    weak, eos = tiny_weak, tiny_weak.info.eos_ids
    config = FrameConfig(4, weak.info.n_vocab)
    prompt = tuple(tiny_strong.tokenize("def add(a, b):"))
    specs = [StreamSpec(10 + i, prompt, SamplingParams(0.7), i, MAX_TOKENS) for i in range(4)]
    expected = {
        s.stream_id: gen.tokens
        for s, gen in zip(
            specs,
            generate(tiny_strong, [Request(prompt, s.params, s.seed, MAX_TOKENS) for s in specs])[
                0
            ],
            strict=True,
        )
    }
    cancelled = specs[0].stream_id  # once its first tokens came ("tick"), or at its end

    async def main() -> dict[int, tuple[list[int], bool]]:
        scheduling = SchedulerConfig(max_batch=4, max_streams=8, frame_tokens=4)
        inner = InnerService(tiny_strong, weak, Calibration(), scheduling)
        relay_session = weak.session(8, 257)
        decoder = FrameDecoder(relay_session, eos, Calibration(), config)
        ledger = SqliteLedger(tmp_path / "ledger.db", Budgets(1 << 30))
        with weak.session(TABLE, 257) as up, weak.session(TABLE, 257) as down:
            encoder = FrameEncoder(up, eos, Calibration(), config)
            outer = FrameDecoder(down, eos, Calibration(), config)
            async with in_process(inner, decoder, weak.info, Calibration(), ledger, tmp_path,
                                  tick_s=0.002) as pair:  # fmt: skip
                service = OuterService(weak, pair.uplink, max_context=256)
                service.start()
                frames = RelayFrames(service, encoder, asyncio.get_running_loop(), eos_ids=eos,
                                     max_streams=TABLE, release=release)  # fmt: skip
                service.on_stream_end = frames.stream_ended
                got: dict[int, tuple[list[int], bool]] = {}
                for spec in specs:
                    outer.add_stream(spec)
                    extra = GenerationRequest(spec, f"r{spec.stream_id}").extra()
                    await asyncio.to_thread(frames.open_stream, spec, extra)
                    got[spec.stream_id] = ([], False)
                async with asyncio.timeout(120):
                    while not all(done for _, done in got.values()):
                        data = await asyncio.to_thread(frames.next_frame)
                        if data is None:
                            await asyncio.sleep(0.01)
                            continue
                        content, _ = outer.decode(data)
                        for sid, tokens in content.tokens.items():
                            got[sid][0].extend(tokens)
                        for sid, (tokens, _) in got.items():
                            if sid in content.ended or ends_stream(tokens, MAX_TOKENS, eos):
                                got[sid] = (tokens, True)
                        if got[cancelled][0]:
                            await asyncio.to_thread(frames.cancel, cancelled)
                await service.aclose()
            encoder.close()
            outer.close()
        decoder.close()
        relay_session.close()
        return got

    got = asyncio.run(main())
    for sid, (tokens, _) in got.items():
        if sid == cancelled:
            assert tokens and tokens == expected[sid][: len(tokens)]
        else:
            assert tokens == expected[sid], sid
