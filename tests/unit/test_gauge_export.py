"""Gauged GGUF serving copies on the tiny model, served by llama.cpp: `rewrite_gguf` copies all
but what it replaces; the GGUF gauge is the Hugging Face gauge; a gauged copy computes what the
ungauged copy of the same type computes; re-gauging a copy moves values without changing them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFValueType, GGUFWriter
from typer.testing import CliRunner

from uplimit.cli import app
from uplimit.errors import ConfigError
from uplimit.gauge.export import export_gguf, gauge_gguf, gguf_dims
from uplimit.gauge.transform import apply_gauge, random_gauge
from uplimit.models.gguf_names import gguf_name, hf_name
from uplimit.models.gguf_write import Replacement, dequantized, rewrite_gguf
from uplimit.models.hf import HFModel
from uplimit.models.llama import LlamaModel
from uplimit.models.store import sha256_file
from uplimit.models.tiny import export_gguf as tiny_gguf

PROMPTS = [list(range(5, 45)), list(range(300, 260, -1)), [7, 100, 3, 250, 9, 12]]
ANSWER = 12


@pytest.fixture(scope="module")
def source(tiny_pair_dirs: tuple[Path, Path]) -> Path:
    return tiny_gguf(tiny_pair_dirs[0])


def tensors(path: Path) -> dict[str, np.ndarray]:
    return {t.name: dequantized(t) for t in GGUFReader(path).tensors}


def run(path: Path) -> tuple[list[np.ndarray], list[list[int]]]:
    """llama.cpp logits of every prompt position and greedy answer, one token per call."""
    model = LlamaModel(path, n_threads=1)
    logits, answers = [], []
    with model.session(1, 128) as s:
        for prompt in PROMPTS:
            seq, row = s.prefill(prompt)
            rows, answer = [row.copy()], []
            for _ in range(ANSWER):
                answer.append(int(np.argmax(rows[-1])))
                rows.append(s.step({seq: answer[-1]})[seq].copy())
            s.drop(seq)
            logits.append(np.stack(rows))
            answers.append(answer)
    model.close()
    return logits, answers


def max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def test_names_round_trip() -> None:
    for name in ("model.embed_tokens.weight", "model.layers.7.self_attn.k_proj.bias"):
        assert hf_name(gguf_name(name)) == name
    with pytest.raises(ConfigError):
        hf_name("blk.0.ffn_gate_exps.weight")


def test_rewrite_copies_all_but_what_it_replaces(source: Path, tmp_path: Path) -> None:
    up = "blk.0.ffn_up.weight"
    before = tensors(source)
    out = tmp_path / "copy.gguf"
    rewrite_gguf(
        source,
        out,
        {
            up: Replacement(GGMLQuantizationType.F16, lambda: 2 * before[up]),
            "blk.1.ffn_down.weight": Replacement(
                GGMLQuantizationType.Q8_0, before["blk.1.ffn_down.weight"]
            ),
        },
        metadata={"uplimit.test": ("yes", GGUFValueType.STRING)},
    )
    a, b = GGUFReader(source), GGUFReader(out)
    assert b.get_field("uplimit.test").contents() == "yes"
    for field in a.fields.values():
        if not field.name.startswith("GGUF."):
            assert b.get_field(field.name).contents() == field.contents(), field.name
    types = {t.name: t.tensor_type for t in b.tensors}
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert types[up] == GGMLQuantizationType.F16
    assert types["blk.1.ffn_down.weight"] == GGMLQuantizationType.Q8_0
    after = tensors(out)
    assert np.array_equal(after[up], (2 * before[up]).astype(np.float16).astype(np.float32))
    q8_err = np.abs(after["blk.1.ffn_down.weight"] - before["blk.1.ffn_down.weight"]).max()
    assert 0 < q8_err < 0.01 * np.abs(before["blk.1.ffn_down.weight"]).max()
    for t in a.tensors:
        if t.name not in (up, "blk.1.ffn_down.weight"):
            assert np.array_equal(after[t.name], before[t.name]), t.name
    LlamaModel(out, n_threads=1).close()  # llama.cpp reads it

    with pytest.raises(ConfigError, match="no tensor"):
        rewrite_gguf(
            source, tmp_path / "x.gguf", {"nope": Replacement(GGMLQuantizationType.F32, before[up])}
        )
    with pytest.raises(ConfigError, match="shape"):
        rewrite_gguf(
            source, tmp_path / "x.gguf", {up: Replacement(GGMLQuantizationType.F32, before[up].T)}
        )
    assert not (tmp_path / "x.gguf").exists() and list(tmp_path.iterdir()) == [
        out
    ]  # no staging left


def test_gguf_gauge_is_the_hf_gauge(
    source: Path, tiny_pair_dirs: tuple[Path, Path], tmp_path: Path
) -> None:
    hf = HFModel(tiny_pair_dirs[0]).torch_model
    gauge = random_gauge(hf.config, 3)
    assert random_gauge(gguf_dims(GGUFReader(source)), 3).digest() == gauge.digest()
    apply_gauge(hf, gauge)
    exported = gauge_gguf(source, tmp_path / "g.gguf", 3, dtype="f32")
    assert exported.gauge_digest == gauge.digest()
    got = tensors(exported.path)
    params = dict(hf.named_parameters())
    assert set(got) == {gguf_name(n) for n in params}
    for name, param in params.items():
        assert np.array_equal(got[gguf_name(name)], param.detach().numpy()), name


@pytest.mark.parametrize(("dtype", "tolerance"), [("f32", 0.02), ("f16", 0.1)])
def test_gauged_copy_computes_what_the_plain_copy_does(
    source: Path, tiny_pair_dirs: tuple[Path, Path], tmp_path: Path, dtype: str, tolerance: float
) -> None:
    """llama.cpp: the only difference is the gauge, so logits differ by summation order only,
    rounded to F16 where llama.cpp rounds (its KV cache; F16 matmul inputs): measured 0.006
    (f32) and 0.021 (f16), logits up to 35. A change that is not a gauge (the weak model's
    1.5 % noise) moves them by ~48."""
    plain = export_gguf(source, tmp_path / "plain.gguf", None, dtype=dtype)
    gauged = gauge_gguf(source, tmp_path / "gauged.gguf", 1, dtype=dtype)
    other = export_gguf(tiny_gguf(tiny_pair_dirs[1]), tmp_path / "weak.gguf", None, dtype=dtype)
    assert plain.sha256 != gauged.sha256 and plain.gauge_digest is None
    assert GGUFReader(gauged.path).get_field("general.file_type").contents() == (
        1 if dtype == "f16" else 0
    )
    (pl, pa), (gl, ga), (ol, _) = run(plain.path), run(gauged.path), run(other.path)
    assert ga == pa
    assert max_diff(gl, pl) < tolerance
    assert max_diff(ol, pl) > 10 * tolerance


def test_regauging_a_copy_only_moves_its_values(source: Path, tmp_path: Path) -> None:
    """F16 -> gauge -> F16 is exact, so gauges compose on serving copies without drift."""
    plain = tensors(export_gguf(source, tmp_path / "plain.gguf", None).path)
    first = gauge_gguf(source, tmp_path / "a.gguf", 1)
    second = tensors(gauge_gguf(first.path, tmp_path / "b.gguf", 2).path)
    for name, values in plain.items():
        assert not np.array_equal(second[name], values), name
        assert np.array_equal(
            np.sort(np.abs(second[name]), axis=None), np.sort(np.abs(values), axis=None)
        )


def test_other_architectures_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    writer = GGUFWriter(path, arch="llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ConfigError, match="qwen2"):
        gauge_gguf(path, tmp_path / "out.gguf", 1)


def test_export_command(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "g.gguf"
    args = ["gauge", "export", "--model", str(source), "--seed", "5", "--out", str(out)]
    done = CliRunner().invoke(app, args)
    assert done.exit_code == 0, done.output
    assert sha256_file(out) == gauge_gguf(source, tmp_path / "h.gguf", 5).sha256
