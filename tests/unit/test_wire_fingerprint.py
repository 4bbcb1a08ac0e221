"""The codec fingerprint: what it covers, how a difference is named, how a refusal travels."""

from __future__ import annotations

import dataclasses

import pytest

from uplimit.coding.calibration import Calibration
from uplimit.errors import ConfigError
from uplimit.wire.fingerprint import (
    CODEC_VERSION,
    codec_fingerprint,
    differences,
    fingerprint_digest,
    refusal_fields,
    refused_differences,
    short_value,
)
from uplimit.wire.frame import FrameConfig
from uplimit.wire.protocol import Hello, Refuse, UplinkParser, encode_downlink, encode_uplink


@pytest.fixture
def fingerprint(tiny_weak) -> dict[str, str]:
    return codec_fingerprint(tiny_weak.info, Calibration(), FrameConfig(6, tiny_weak.info.n_vocab))


def test_the_fingerprint_covers_everything_exact_decoding_depends_on(tiny_weak, fingerprint):
    info = tiny_weak.info
    assert fingerprint["codec.version"] == CODEC_VERSION
    assert fingerprint["weak.sha256"] == info.file_sha256
    assert fingerprint["weak.backend"] == "hf"
    assert fingerprint["weak.build"] == info.build
    assert fingerprint["weak.eos_ids"] == ",".join(map(str, sorted(info.eos_ids)))
    assert fingerprint["calibration.sha256"] == Calibration().digest()
    assert fingerprint["frame.max_tokens_per_stream"] == "6"
    assert fingerprint["frame.n_vocab"] == str(info.n_vocab)
    assert fingerprint["numpy.simd"].startswith("baseline ")  # the kernels numpy's log runs
    assert set(fingerprint) >= {"numpy.version", "cpu.machine", "weak.n_vocab"}
    encode_downlink(Hello.of(fingerprint))  # fits a HELLO as it is


def test_every_change_changes_the_digest(tiny_weak, fingerprint):
    digest = fingerprint_digest(fingerprint)
    assert len(digest) == 4 and digest == fingerprint_digest(dict(reversed(fingerprint.items())))
    info = tiny_weak.info
    others = [
        codec_fingerprint(info, Calibration(greedy_miss_scale=2.0), FrameConfig(6, info.n_vocab)),
        codec_fingerprint(info, Calibration(), FrameConfig(7, info.n_vocab)),
        codec_fingerprint(dataclasses.replace(info, build="other"), Calibration(), FrameConfig(6)),
        {**fingerprint, "numpy.version": "1.26.4"},
    ]
    assert all(fingerprint_digest(o) != digest for o in others)


def test_a_model_without_a_file_hash_is_refused(tiny_weak):
    unhashed = dataclasses.replace(tiny_weak.info, file_sha256="")
    with pytest.raises(ConfigError, match="no file hash"):
        codec_fingerprint(unhashed, Calibration(), FrameConfig())


def test_values_are_made_one_line(tiny_weak):
    info = dataclasses.replace(tiny_weak.info, build="llama.cpp\n  CPU : AVX = 1\t| x")
    assert codec_fingerprint(info, Calibration(), FrameConfig())["weak.build"] == (
        "llama.cpp CPU : AVX = 1 | x"
    )


def test_differences_name_each_field_with_both_values():
    outer = {"a": "1", "b": "2", "c": "3"}
    inner = {"a": "1", "b": "20", "d": "4"}
    assert [d.describe() for d in differences(outer, inner)] == [
        "b: outer '2', inner '20'",
        "c: outer '3', inner (missing)",
        "d: outer (missing), inner '4'",
    ]


def test_a_refusal_tells_the_outer_every_difference_with_both_values(fingerprint):
    inner = dict(fingerprint)
    inner["numpy.version"] = "1.26.4"
    inner["weak.build"] = "x" * 400  # too long for a refusal: shortened, with a hash
    del inner["cpu.machine"]
    inner["extra.field"] = "1"
    fields = refusal_fields(list(fingerprint), differences(fingerprint, inner))
    data = encode_uplink(Refuse(fields))
    assert len(data) < 400  # a refusal is charged like any upload: it stays short
    (refusal,) = UplinkParser(len(fingerprint)).feed(data)
    lines = refused_differences(fingerprint, refusal.fields)
    assert lines[0] == f"cpu.machine: outer {fingerprint['cpu.machine']!r}, inner '(missing)'"
    assert lines[1] == f"numpy.version: outer {fingerprint['numpy.version']!r}, inner '1.26.4'"
    assert lines[2].startswith("weak.build: outer ") and "inner 'xxx" in lines[2]
    assert "[sha256 " in lines[2]
    assert lines[3] == "(fields only the inner has): extra.field"


def test_short_values_keep_their_start_and_a_hash():
    assert short_value("abc") == "abc"
    long = "é" * 300  # 600 bytes
    short = short_value(long)
    assert len(short.encode()) <= 255 and short.startswith("éé") and "[sha256 " in short
    assert short_value(long + "x") != short
