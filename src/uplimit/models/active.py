"""Which weak model a side serves after a rollout: a small JSON record per side.

A rollout (`outer.rollout`, `link.rollout`) switches both sides to a new weak model while they
run. Each side then writes this record, so that after a restart it serves the model it switched
to instead of `[models] weak`; both sides must, or the handshake refuses (their fingerprints'
`weak.sha256` differ). Deleting the record returns a side to `[models] weak`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from uplimit.config import Config, Side, rollout_record_path
from uplimit.errors import ConfigError

__all__ = ["ActiveWeak", "with_active_weak"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ActiveWeak:
    weak: str  # the GGUF file
    calibration: str  # its calibration JSON
    sha256: str  # the file's
    since: float = dataclasses.field(default_factory=time.time)

    def save(self, path: Path) -> None:
        """Write atomically: a crash leaves the old record or the new one, never half."""
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w") as f:
            json.dump(dataclasses.asdict(self), f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> ActiveWeak | None:
        """The record, or None if there is none; a malformed one is an error, not ignored."""
        try:
            raw = json.loads(path.read_text())
            record = cls(**raw)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as e:
            raise ConfigError(f"rollout record {path} is unreadable: {e}") from e
        if not all(isinstance(v, str) and v for v in (record.weak, record.calibration)):
            raise ConfigError(f"rollout record {path} names no model or calibration")
        return record


def with_active_weak(config: Config, side: Side) -> Config:
    """`config` with `[models] weak` and `calibration` from the side's rollout record, if any."""
    path = rollout_record_path(config, side)
    record = ActiveWeak.load(path)
    if record is None:
        return config
    log.warning(
        "%s: serving the weak model a rollout switched to, %s (sha256 %s…), not [models] weak;"
        " delete %s to go back",
        side,
        record.weak,
        record.sha256[:16],
        path,
    )
    models = dataclasses.replace(config.models, weak=record.weak, calibration=record.calibration)
    return dataclasses.replace(config, models=models)
