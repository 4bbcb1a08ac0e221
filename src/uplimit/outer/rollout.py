"""The outer side of a weak-model rollout: check the new model, send it down, switch.

A new weak model (e.g. a distilled one, `uplimit distill`) is a new codec. The outer side has
the file, so it sends it down (downloads are free of the upload budget; what they cost is the
inner's TCP ACKs, which the kernel quota counts, docs/distill.md) at 3/4 of the rate the inner
accepts, then switches: under one lock with OPEN_STREAM, its decoder makes the new model
current and SWITCH goes down, so both sides code every stream opened after that point with
the new model, and every stream opened before it with the old one until it ends
(`wire.frame`). The inner checks the file's hash and the new fingerprint; if either differs
it ends the link (fail closed). Finally the outer records the switch (`models.active`).

One rollout at a time. `status` says how far it got, for `GET /admin/rollout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from uplimit.coding.calibration import Calibration
from uplimit.errors import ConfigError, UplimitError
from uplimit.link.outer_link import OuterLink
from uplimit.models.active import ActiveWeak
from uplimit.models.base import LanguageModel
from uplimit.models.loading import check_same_tokenizer
from uplimit.wire.fingerprint import codec_fingerprint
from uplimit.wire.frame import FrameConfig
from uplimit.wire.protocol import ByteRate, ModelData, ModelOffer

__all__ = ["Rollout", "RolloutBusy", "RolloutStatus"]

log = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 18  # a MODEL_DATA message's data; well under the inner's message limit
PACE = 0.75  # of the inner's downlink rate: room for the requests that share the downlink


class RolloutBusy(ConfigError):
    """A rollout is already under way."""


@dataclass
class RolloutStatus:
    state: str = "idle"  # idle | checking | sending | switched | failed
    weak: str = ""
    sha256: str = ""
    total_bytes: int = 0
    sent_bytes: int = 0
    started: float = 0.0
    switched: float = 0.0
    error: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


class Rollout:
    def __init__(
        self,
        link: OuterLink,
        current: LanguageModel,
        frame_config: FrameConfig,
        *,
        session_size: tuple[int, int],
        record: Path,
        load: Callable[[Path], LanguageModel],
        downlink_bytes_per_s: float,
    ) -> None:
        """`session_size`: (sequences, context) of a weak session, as the decoder's."""
        self.link = link
        self.current = current
        self.frame_config = frame_config
        self.session_size = session_size
        self.record = record
        self.load = load
        self.bytes_per_s = PACE * downlink_bytes_per_s
        self.status = RolloutStatus()
        self._task: asyncio.Task[None] | None = None

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self, weak: str | Path, calibration: str | Path) -> RolloutStatus:
        """Begin rolling out `weak` with `calibration` (raises ConfigError if one is running
        or the files are missing); it goes on in the background."""
        if self.running:
            raise RolloutBusy(f"a rollout of {self.status.weak} is already under way")
        weak, calibration = Path(weak).expanduser(), Path(calibration).expanduser()
        for path in (weak, calibration):
            if not path.is_file():
                raise ConfigError(f"not a file: {path}")
        self.status = RolloutStatus("checking", str(weak), started=time.time())
        self._task = asyncio.create_task(self._run(weak, calibration))
        return self.status

    async def _run(self, path: Path, calibration_path: Path) -> None:
        status = self.status
        model: LanguageModel | None = None
        try:
            calibration = Calibration.load(calibration_path)
            status.total_bytes = path.stat().st_size
            model = await asyncio.to_thread(self.load, path)
            status.sha256 = model.info.file_sha256  # the loader hashed the file
            fingerprint = self._check(model, calibration)
            status.state = "sending"
            await self._send(path, bytes.fromhex(status.sha256), calibration)
            session = model.session(*self.session_size)
            loaded = model

            def release() -> None:
                session.close()
                loaded.close()

            decoder = self.link.decoder
            await self.link.switch_weak(
                lambda: decoder.switch(session, calibration, release), fingerprint
            )
            model = None  # the decoder owns it now
            ActiveWeak(str(path), str(calibration_path), status.sha256).save(self.record)
            status.state, status.switched = "switched", time.time()
            log.warning("rollout: streams opened from now on use weak model %s", status.sha256)
        except (UplimitError, OSError, ValueError) as e:
            status.state, status.error = "failed", str(e)
            log.error("rollout of %s failed: %s", path, e)
        finally:
            if model is not None:
                model.close()

    def _check(self, model: LanguageModel, calibration: Calibration) -> dict[str, str]:
        """The new codec fingerprint; raises unless the model can replace the current one."""
        check_same_tokenizer(self.current, model)
        fingerprint = codec_fingerprint(model.info, calibration, self.frame_config)
        if fingerprint == self.link.fingerprint:
            raise ConfigError("the link already codes with this weak model and calibration")
        return fingerprint

    async def _send(self, path: Path, sha256: bytes, calibration: Calibration) -> None:
        offer = ModelOffer(sha256, self.status.total_bytes, calibration.to_json().encode())
        await self.link.send_model(offer)
        rate = ByteRate(self.bytes_per_s, CHUNK_BYTES, time.monotonic())
        with path.open("rb") as f:
            while chunk := await asyncio.to_thread(f.read, CHUNK_BYTES):
                while not rate.take(len(chunk), time.monotonic()):
                    await asyncio.sleep(len(chunk) / self.bytes_per_s / 4)
                await self.link.send_model(ModelData(chunk))
                self.status.sent_bytes += len(chunk)
        if self.status.sent_bytes != self.status.total_bytes:
            raise ConfigError("the model file changed size while it was being sent")

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
