"""Coverage-guided fuzzing of what the outer side reads from the inner (atheris, libFuzzer).

Not part of the test suite (pytest collects test_*.py only). Run, for a fixed number of inputs:

    .venv/bin/python tests/fuzz/fuzz_link.py uplink   -runs=500000
    .venv/bin/python tests/fuzz/fuzz_link.py downlink -runs=500000
    .venv/bin/python tests/fuzz/fuzz_link.py receiver -runs=20000

libFuzzer ends with "Done N runs in S second(s)"; any crash stops it and saves the input.

Targets (the first input byte picks the chunk size the bytes are fed in, 1..64):
  uplink    `UplinkParser`: either messages whose canonical encoding is exactly the bytes it
            consumed (after the handshake, the bytes it hands on as they are), or
            `ProtocolError`. Any other exception, or a non-canonical parse, crashes.
  downlink  `DownlinkParser`: the same, after the preamble.
  receiver  `UplinkReceiver` with the real `FrameDecoder` on the tiny weak model, fed a verdict
            and frames coded by the real encoder (seeded into the corpus) as libFuzzer mutates
            them. It must never raise, and a delivered frame must be exactly what the encoder
            sent under that frame number: nothing else is ever delivered. Bytes left waiting
            for more are judged as they are (`expire`) before the end of the stream.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["uplimit.wire"]):
    from uplimit.wire.protocol import (
        DOWNLINK_PREAMBLE,
        DownlinkParser,
        FrameBytes,
        ProtocolError,
        UplinkParser,
        encode_downlink,
        encode_uplink,
    )

FIELDS = 12


def _feed(parser, data: bytes, encode) -> None:
    step = 1 + data[0] % 64 if data else 1
    body, consumed = data[1:], []
    try:
        for i in range(0, len(body), step):
            consumed += parser.feed(body[i : i + step])
    except ProtocolError:
        return
    used = len(body) - parser.buffered
    if encode(consumed) != body[:used]:
        raise AssertionError(f"non-canonical parse of {body[:used]!r}: {consumed!r}")


def uplink(data: bytes) -> None:
    def encode(msgs) -> bytes:
        return b"".join(m.data if isinstance(m, FrameBytes) else encode_uplink(m) for m in msgs)

    _feed(UplinkParser(FIELDS), data, encode)


def downlink(data: bytes) -> None:
    parser = DownlinkParser(n_vocab=151_936)
    parser.feed(DOWNLINK_PREAMBLE)
    _feed(parser, data, lambda ms: b"".join(map(encode_downlink, ms)))


def _receiver_target(corpus: Path):
    """Build the tiny pair, code a few frames, seed the corpus; return the target."""
    import torch

    torch.set_num_threads(1)
    from uplimit.coding.calibration import Calibration
    from uplimit.coding.generate import Request, generate
    from uplimit.coding.sampling import SamplingParams
    from uplimit.models.hf import HFModel
    from uplimit.models.tiny import build_tiny_pair
    from uplimit.wire.fingerprint import codec_fingerprint, fingerprint_digest
    from uplimit.wire.frame import FrameConfig, FrameContent, FrameDecoder, FrameEncoder
    from uplimit.wire.protocol import Accept, Frame, LedgerReport
    from uplimit.wire.receiver import Delivered, UplinkReceiver
    from uplimit.wire.streams import StreamSpec

    strong_dir, weak_dir = build_tiny_pair(Path(tempfile.mkdtemp(prefix="uplimit-fuzz-")))
    strong, weak = HFModel(strong_dir), HFModel(weak_dir)
    k = 4
    config = FrameConfig(k, weak.info.n_vocab)
    fingerprint = codec_fingerprint(weak.info, Calibration(), config)
    specs = [
        StreamSpec(i, tuple(weak.chat_tokens([{"role": "user", "content": f"q{i}"}])),
                   SamplingParams(t), 99 + i, 12)
        for i, t in enumerate([0.0, 1.0])
    ]  # fmt: skip
    gens, _ = generate(strong, [Request(s.prompt, s.params, s.seed, s.max_tokens) for s in specs])
    contents = [
        FrameContent(2 if at == 0 else 0, {i: tuple(g.tokens[at : at + k]) for i, g in
                                            enumerate(gens) if g.tokens[at : at + k]})
        for at in range(0, 12, k)
    ]  # fmt: skip

    def side(cls):
        coder = cls(weak.session(2, 256), weak.info.eos_ids, Calibration(), config)
        for s in specs:
            coder.add_stream(s)
        return coder

    enc = side(FrameEncoder)
    frames = [enc.encode(c)[0] for c in contents]
    stream = encode_uplink(Accept(fingerprint_digest(fingerprint)))
    stream += encode_uplink(LedgerReport(bytes(16), 0, False))
    stream += b"".join(encode_uplink(Frame(f)) for f in frames)
    corpus.mkdir(parents=True, exist_ok=True)
    for step in (0, 7, 63):
        (corpus / f"valid-{step}").write_bytes(bytes([step]) + stream)

    def receiver(data: bytes) -> None:
        session = weak.session(2, 256)
        dec = FrameDecoder(session, weak.info.eos_ids, Calibration(), config)
        for s in specs:
            dec.add_stream(s)
        try:
            rx = UplinkReceiver(fingerprint, dec)
            step = 1 + data[0] % 64 if data else 1
            events = []
            for i in range(1, len(data), step):
                events += rx.receive(data[i : i + step])
            events += rx.expire() + rx.eof()
            for e in events:
                if isinstance(e, Delivered) and e.content != contents[e.stats.frame_no]:
                    raise AssertionError(f"frame {e.stats.frame_no} delivered wrong content")
        finally:
            session.close()

    return receiver


def main() -> None:
    target, flags = sys.argv[1], sys.argv[2:]
    corpus = Path(tempfile.mkdtemp(prefix=f"uplimit-fuzz-{target}-"))
    if target == "uplink":
        test_one = uplink
        (corpus / "seed").write_bytes(b"\x00\x21abcd\x03xyz\x00\x01")  # protocol 2
    elif target == "downlink":
        test_one = downlink
        (corpus / "seed").write_bytes(b"\x00\x01\x00\x00\x00\x05\x01\x01a\x01b")
    elif target == "receiver":
        test_one = _receiver_target(corpus)
    else:
        raise SystemExit(f"unknown target {target!r}: uplink, downlink or receiver")
    atheris.Setup([sys.argv[0], *flags, str(corpus)], test_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
