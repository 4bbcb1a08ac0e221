"""A weak-model rollout through the relay: taken on its uplink, then passed on to the inner.

The tiers switch top-down, each link at its own SWITCH (docs/tiers.md, Rollouts):

1. The outer rolls the file out on link 2 (`outer.rollout`, `uplimit rollout`). The relay,
   an inner towards the outer, takes it as the inner does (`link.rollout.WeakRollout`: the
   file's sha256, the tokenizer of the weak model it codes link 2 with, the new fingerprint),
   and at SWITCH its link-2 encoder codes every stream opened after it with the new model;
   streams opened before finish on theirs. The switch is recorded
   (`rollout_record_path(config, "relay")`), so a restarted relay codes link 2 with it.
2. Then the relay rolls the same file out on link 1 to the inner through its own outer role's
   `Rollout` (the one `/admin/rollout` on the relay drives), which checks it again, sends it
   down, switches its decoder and records it (`rollout_record_path(config, "outer")`).

The relay's `GET /admin/rollout` shows both: "receiving" while link 2's file comes (with its
bytes so far), then link 1's rollout ("checking", "sending", "switched"), or "failed" with
why. Anything wrong with what link 2 sent ends that link with END(error) (a `ProtocolError`:
the relay keeps serving its own users and waits for the next outer), and nothing is switched.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from uplimit.coding.calibration import Calibration
from uplimit.errors import ConfigError, ProtocolError, UplimitError
from uplimit.link.rollout import WeakRollout
from uplimit.models.active import ActiveWeak
from uplimit.models.base import LanguageModel
from uplimit.outer.rollout import Rollout, RolloutStatus
from uplimit.wire.frame import FrameEncoder
from uplimit.wire.protocol import ModelOffer

__all__ = ["RelaySink", "RelayWeak"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class RelayWeak:
    """The weak model the relay codes link 2 with, from one outer's link to the next, and the
    rollouts it takes there (module doc). Models a rollout brought stay loaded until `close`."""

    def __init__(
        self,
        weak: LanguageModel,
        calibration: Calibration,
        *,
        directory: Path,
        record: Path,
        load: Callable[[Path], LanguageModel],
        below: Rollout,
        session_size: tuple[int, int],
    ) -> None:
        """`below`: the relay's link-1 rollout; `session_size`: (sequences, context) of the
        link-2 encoder's weak session."""
        self.weak, self.calibration = weak, calibration
        self._directory, self._record, self._load = directory, record, load
        self._below = below
        self._session_size = session_size
        self._loop = asyncio.get_running_loop()  # the link-1 rollout runs on it
        self._brought: list[LanguageModel] = []

    def own(self, weak: LanguageModel, calibration: Calibration) -> None:
        """Code link 2 with `weak` from the next link on, and close it at the end."""
        self._brought.append(weak)
        self.weak, self.calibration = weak, calibration

    def sink(self, encoder: FrameEncoder) -> RelaySink:
        """Where one link's rollout messages go; `encoder` is that link's."""
        receiver = WeakRollout(
            self.weak, encoder.config, functools.partial(self._switch, encoder),
            self._directory, self._record, self._load, on_switched=self._switched,
        )  # fmt: skip
        return RelaySink(receiver, self._below)

    def _switch(self, encoder: FrameEncoder, weak: LanguageModel, calibration: Calibration) -> None:
        session = weak.session(*self._session_size)
        encoder.switch(session, calibration, session.close)
        self.own(weak, calibration)

    def _switched(self, record: ActiveWeak) -> None:
        """Link 2 switched (a worker thread): pass the file on down link 1."""
        self._loop.call_soon_threadsafe(self._roll_below, record)

    def _roll_below(self, record: ActiveWeak) -> None:
        try:
            self._below.start(record.weak, record.calibration)
        except ConfigError as e:  # e.g. an operator's rollout of link 1 is under way
            self._below.status = RolloutStatus(
                "failed", record.weak, record.sha256, error=f"link 1: {e}"
            )
            log.error("relay: cannot roll %s out to the inner: %s", record.weak, e)
        else:
            log.warning("relay: rolling weak model %s out to the inner", record.sha256)

    def close(self) -> None:
        for weak in self._brought:
            weak.close()
        self._brought.clear()


class RelaySink:
    """`link.inner_link.ModelSink` of one link 2: `WeakRollout`, its progress shown as the
    relay's rollout status (unless a link-1 rollout is under way), and any failure a
    `ProtocolError` (module doc)."""

    def __init__(self, receiver: WeakRollout, below: Rollout) -> None:
        self._receiver = receiver
        self._below = below
        self._status = RolloutStatus()

    def offer(self, offer: ModelOffer) -> None:
        self._status = RolloutStatus(
            "receiving", sha256=offer.sha256.hex(), total_bytes=offer.size, started=time.time()
        )
        if not self._below.running:
            self._below.status = self._status
        self._refusing(self._receiver.offer, offer)

    def data(self, data: bytes) -> None:
        self._refusing(self._receiver.data, data)
        self._status.sent_bytes += len(data)  # here: the bytes received so far

    def switch(self, fingerprint_sha256: bytes) -> None:
        self._refusing(self._receiver.switch, fingerprint_sha256)

    def close(self) -> None:
        self._receiver.close()

    def _refusing(self, step: Callable[[T], None], arg: T) -> None:
        try:
            step(arg)
        except (UplimitError, OSError, ValueError) as e:
            self._status.state, self._status.error = "failed", f"link 2: {e}"
            raise ProtocolError(f"the outer's rollout is refused: {e}") from e
