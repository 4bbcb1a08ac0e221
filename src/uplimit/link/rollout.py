"""The receiving end of a weak-model rollout: receive the model, check it, switch at SWITCH.

The end above sends a new weak model down (MODEL_OFFER, MODEL_DATA..., SWITCH; the parser
enforces that order, `wire.protocol`). Downloads are not budgeted, so the whole file comes
down, never a delta the receiver would have to trust. The inner receives it on its link
(`inner.serve`), and so does a relay on its link to the outer (`relay.rollout`), each with its
own `switch`. Here:

- the file is written to `directory` under a temporary name and hashed as it arrives; only a
  file with the offered sha256 is renamed to `weak-<sha256[:16]>.gguf`, beside its calibration;
- at SWITCH the model is loaded, must share the tokenizer of `reference` (the inner's strong
  model, the relay's weak one), and the codec fingerprint it gives must hash to the one the
  sender sent: otherwise this raises and the serving loop ends the link (END(error)), since
  the two ends would no longer decode alike;
- then `switch` makes the encoder code every stream opened after SWITCH with the new model,
  while running streams finish on the old one (`wire.frame`), and the choice is recorded
  (`models.active`) so that a restarted receiver serves the new model.

Loading happens inside the serving loop, so frames pause while the model loads (seconds).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from uplimit.coding.calibration import Calibration
from uplimit.errors import ConfigError, FingerprintMismatch, ProtocolError
from uplimit.models.active import ActiveWeak
from uplimit.models.base import LanguageModel
from uplimit.models.loading import check_same_tokenizer
from uplimit.wire.fingerprint import codec_fingerprint, fingerprint_sha256
from uplimit.wire.frame import FrameConfig
from uplimit.wire.protocol import ModelOffer

__all__ = ["WeakRollout"]

log = logging.getLogger(__name__)


class _Incoming:
    """One offered file while it arrives: a temporary file and a running hash."""

    def __init__(self, offer: ModelOffer, calibration: Calibration, directory: Path) -> None:
        self.offer = offer
        self.calibration = calibration
        self.name = f"weak-{offer.sha256.hex()[:16]}"
        self.tmp = directory / f".{self.name}.incoming"
        self.file: BinaryIO = self.tmp.open("wb")
        self.hash = hashlib.sha256()
        self.received = 0


class WeakRollout:
    """`link.inner_link.ModelSink` (module doc). `switch(weak, calibration)` makes the encoder
    code new streams with `weak`, and owns it from then on; `frame_config` is that encoder's.
    `on_switched(record)`, if given, is called once the switch is recorded."""

    def __init__(
        self,
        reference: LanguageModel,
        frame_config: FrameConfig,
        switch: Callable[[LanguageModel, Calibration], None],
        directory: Path,
        record: Path,
        load: Callable[[Path], LanguageModel],
        *,
        on_switched: Callable[[ActiveWeak], None] | None = None,
    ) -> None:
        self.reference = reference
        self.frame_config = frame_config
        self._switch = switch
        self.directory = directory
        self.record = record
        self.load = load
        self.on_switched = on_switched
        self._incoming: _Incoming | None = None
        self._ready: tuple[Path, Path, Calibration, str] | None = None  # model, cal, sha256

    def offer(self, offer: ModelOffer) -> None:
        try:
            calibration = Calibration.from_json(offer.calibration.decode())
        except (UnicodeDecodeError, ConfigError) as e:
            raise ProtocolError(f"MODEL_OFFER: the calibration does not parse: {e}") from e
        self.directory.mkdir(parents=True, exist_ok=True)
        self._discard()
        self._incoming = _Incoming(offer, calibration, self.directory)
        log.info("rollout: receiving weak model %s (%s bytes)", offer.sha256.hex(), offer.size)

    def data(self, data: bytes) -> None:
        incoming = self._incoming
        if incoming is None:  # the parser allows DATA only after an OFFER
            raise ProtocolError("MODEL_DATA without an offer")
        incoming.file.write(data)
        incoming.hash.update(data)
        incoming.received += len(data)
        if incoming.received == incoming.offer.size:
            self._complete(incoming)

    def _complete(self, incoming: _Incoming) -> None:
        incoming.file.close()
        self._incoming = None
        sha256 = incoming.hash.hexdigest()
        if sha256 != incoming.offer.sha256.hex():
            incoming.tmp.unlink()
            raise ProtocolError(
                f"the offered weak model arrived with sha256 {sha256}, not the offered"
                f" {incoming.offer.sha256.hex()}"
            )
        path = self.directory / f"{incoming.name}.gguf"
        incoming.tmp.replace(path)
        calibration_path = self.directory / f"{incoming.name}.calibration.json"
        calibration_path.write_text(incoming.calibration.to_json())
        self._ready = (path, calibration_path, incoming.calibration, sha256)
        log.info("rollout: weak model %s complete at %s", sha256, path)

    def switch(self, digest: bytes) -> None:
        if self._ready is None:  # the parser allows SWITCH only after the whole file
            raise ProtocolError("SWITCH before a complete model")
        path, calibration_path, calibration, sha256 = self._ready
        self._ready = None
        weak = self.load(path)
        try:
            check_same_tokenizer(self.reference, weak)
            fingerprint = codec_fingerprint(weak.info, calibration, self.frame_config)
            if fingerprint_sha256(fingerprint) != digest:
                raise FingerprintMismatch(
                    "rollout: the new weak model gives a codec fingerprint other than the"
                    f" sender's; this side's: {fingerprint}",
                    [],
                )
            self._switch(weak, calibration)
        except BaseException:
            weak.close()
            raise
        record = ActiveWeak(str(path), str(calibration_path), sha256)
        record.save(self.record)
        log.warning("rollout: new streams are coded with weak model %s", sha256)
        if self.on_switched is not None:
            self.on_switched(record)

    def close(self) -> None:
        self._discard()

    def _discard(self) -> None:
        """Drop a transfer that will not complete (a new offer, or the link ended)."""
        if self._incoming is not None:
            self._incoming.file.close()
            self._incoming.tmp.unlink(missing_ok=True)
            self._incoming = None
