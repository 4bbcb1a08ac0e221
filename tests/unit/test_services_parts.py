"""The services' sans-IO pieces: config, request options, stops, text, reasoning, seeds."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from uplimit.coding.sampling import SamplingParams
from uplimit.config import load_config
from uplimit.errors import ConfigError, InvalidRequest, ProtocolError
from uplimit.inner.audit import AuditStore, GenerationRecord
from uplimit.inner.reasoning import NoiseKeys, Splitter
from uplimit.outer.text import TextAssembler
from uplimit.wire.request import GenerationRequest, candidate_seed, choice_seed
from uplimit.wire.stops import StopMatcher
from uplimit.wire.streams import StreamSpec

# A toy vocabulary: token i is the i-th piece; 9 and 10 cut a UTF-8 character in two.
PIECES = [b"a", b"b", b"<", b"th", b"ink", b">", b"</", b" ", b"STOP", b"\xc3", b"\xa9"]
EOS = 11


def piece(t: int) -> bytes:
    return b"" if t == EOS else PIECES[t]


# --- config -----------------------------------------------------------------------------------


def test_config_defaults_file_and_environment(tmp_path):
    assert load_config(None, env={}).outer.port == 8000
    path = tmp_path / "c.toml"
    path.write_text('[outer]\nport = 9001\nmodel_name = "m"\n[link]\ntick_s = 1\n')
    config = load_config(path, env={"UPLIMIT_OUTER_PORT": "9002", "UPLIMIT_INNER_BEST_OF": "3"})
    assert (config.outer.port, config.outer.model_name) == (9002, "m")
    assert config.inner.best_of == 3 and config.link.tick_s == 1.0


@pytest.mark.parametrize(
    ("text", "env"),
    [
        ("[outer]\nprot = 1\n", {}),  # a typo is an error, not a default
        ("[nope]\n", {}),
        ('[outer]\nport = "x"\n', {}),
        ("", {"UPLIMIT_OUTER_PORT": "eighty"}),
        ('[inner]\nreasoning_open = "<think>"\n', {}),  # one marker without the other
        ("not toml [", {}),
    ],
)
def test_bad_config(tmp_path, text, env):
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError):
        load_config(path, env=env)


# --- request options --------------------------------------------------------------------------


def test_request_options_round_trip():
    spec = StreamSpec(3, (1, 2), SamplingParams(0.7), 99, 10)
    req = GenerationRequest(spec, "chatcmpl-1", ("\n\n", "é"), 4)
    assert GenerationRequest.from_extra(spec, req.extra()) == req
    retrieval = GenerationRequest(spec, "w", withheld_id="chatcmpl-1/3")
    assert GenerationRequest.from_extra(spec, retrieval.extra()).withheld_id == "chatcmpl-1/3"
    # Options that came down the link are the peer's bytes; the same limits on a client's input
    # are the client's fault.
    for bad in (b"", b"{}", b"[1]", b'{"request_id": "x", "stop": 5, "best_of": 1}',
                b'{"request_id": "x", "stop": [], "best_of": 17}'):  # fmt: skip
        with pytest.raises(ProtocolError):
            GenerationRequest.from_extra(spec, bad)
    with pytest.raises(InvalidRequest):
        GenerationRequest(spec, "x", stop=("a",) * 5)
    with pytest.raises(InvalidRequest):
        GenerationRequest(spec, "x", best_of=0)


def test_seeds():
    assert choice_seed(7, 0) == 7 and candidate_seed(7, 0) == 7
    seeds = {choice_seed(7, i) for i in range(50)} | {candidate_seed(7, j) for j in range(1, 50)}
    assert len(seeds) == 99  # choice and candidate seeds never collide
    assert all(0 <= s < 1 << 64 for s in seeds)


# --- stops and text ---------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.lists(st.integers(1, 6), max_size=10))
def test_stop_matcher_equals_find_on_the_whole(data, cuts):
    stops = ["ab", "STOP", "\u00e9!"]
    m, out, pos = StopMatcher(stops), b"", 0
    for c in [*cuts, len(data)]:
        out += m.feed(data[pos : pos + c])
        pos += c
    out += m.flush()
    hits = [i for i in (data.find(s.encode()) for s in stops) if i >= 0]
    assert out == (data[: min(hits)] if hits else data)
    assert m.stopped == bool(hits)


def test_text_holds_back_partial_characters_and_stops():
    text = TextAssembler(piece, {EOS}, ["STOP"])
    assert text.feed([0, 9]) == "a"  # half of é waits
    assert text.feed([10]) == "é"
    assert text.feed([7, 8, 0]) == " " and text.stopped
    assert text.tokens == 5  # counted up to the stop's own token
    plain = TextAssembler(piece, {EOS}, [])
    assert plain.feed([0, 9]) + plain.feed([EOS]) + plain.finish() == "a\ufffd"


# --- reasoning --------------------------------------------------------------------------------


def split_all(tokens, markers=("<think>", "</think>")):
    s = Splitter(markers, piece)
    up, held = [], []
    for t in tokens:
        r = s.push(t)
        up += r.uploaded
        held += r.withheld
    return up + s.flush(), held, s


def test_reasoning_spelled_by_several_tokens():
    # "a<think>b</think>a" with the open marker spread over 4 tokens
    tokens = [0, 2, 3, 4, 5, 1, 6, 3, 4, 5, 0]
    up, held, s = split_all(tokens)
    assert up == [0, 0] and held == tokens[1:-1] and not s.inside


def test_false_alarm_is_released():
    up, held, s = split_all([2, 3, 0, 1])  # "<th" then "a": not a marker after all
    assert up == [2, 3, 0, 1] and held == [] and not s.held


def test_unterminated_reasoning_stays_inside():
    up, held, s = split_all([0, 2, 3, 4, 5, 1, 1])
    assert up == [0] and held == [2, 3, 4, 5, 1, 1] and s.inside


def test_no_markers_uploads_everything():
    assert split_all([2, 3, 4, 5], None)[:2] == ([2, 3, 4, 5], [])


def test_noise_keys_never_repeat():
    keys = NoiseKeys(5)
    drawn = [keys.uploaded(0), keys.uploaded(1), keys.withheld(), keys.uploaded(0)]
    drawn += [keys.withheld(), keys.uploaded(0)]
    assert drawn[0] == (5, 0) and drawn[1] == (5, 1)  # first use: the decoder's noise
    assert len(set(drawn)) == len(drawn)


# --- audit ------------------------------------------------------------------------------------


def test_audit_round_trip(tmp_path):
    store = AuditStore(tmp_path / "a.db")
    rec = GenerationRecord(
        "r1", 0, 0, True, "generate", (1 << 64) - 1, "ab", 3, {"temperature": 0.5},
        [1, 2, 3], [1, 3], [2], "r1/0", "x", -0.5, "eos", 10.0,
    )  # fmt: skip
    (row,) = store.record([rec])
    store.mark_uploaded(row, 12.5, 11.0)
    (back,) = store.query(request_id="r1")
    assert back.seed == (1 << 64) - 1 and back.bits_uploaded == 12.5
    assert store.withheld("r1/0") == [2] and store.withheld("nope") is None
    assert store.query(withheld_id="r1/0")[0].id == row
    store.close()
    with pytest.raises(ConfigError):
        AuditStore(tmp_path / "missing" / "a.db")


def test_audit_commands(tmp_path):
    from typer.testing import CliRunner

    from uplimit.cli import app

    store = AuditStore(tmp_path / "a.db")
    rec = GenerationRecord(
        "req-9", 4, 0, True, "generate", 7, "ab", 3, {}, [1, 2], [1], [2], "req-9/4", "x",
        None, "eos", 10.0,
    )  # fmt: skip
    store.record([rec])
    store.close()
    runner, db = CliRunner(), ["--db", str(tmp_path / "a.db")]
    listed = runner.invoke(app, ["audit", "list", *db], env={"COLUMNS": "200"})
    assert listed.exit_code == 0 and "req-9" in listed.output
    shown = runner.invoke(app, ["audit", "show", "req-9/4", "--withheld", *db])
    assert shown.exit_code == 0 and '"withheld_id": "req-9/4"' in shown.output
    assert runner.invoke(app, ["audit", "show", "nope", *db]).exit_code == 1
