"""The inner side's service: scheduler + frame encoder, as the link's serving loop drives them.

`InnerService` is a `link.inner_link.FrameSource`: the serving loop (`serve_frames`, or the
in-process link in tests) calls `open_stream`, `cancel`, `next_frame` and `resend` one at a
time from a worker thread, in downlink order, so the encoder and its weak session are only ever
touched by one thread at a time. The strong model runs in a thread of its own (`start`), so
generation never waits for a tick and a tick never waits for a model step.

Per-stream uplink cost, for the audit store: the bits the encoder spent on the stream's tokens
(`coding.codec.cost_bits`), plus the rest of each frame (counts, flags, check, padding) shared
out by tokens.
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import TYPE_CHECKING

from uplimit.coding.calibration import Calibration
from uplimit.coding.codec import Prediction, cost_bits
from uplimit.errors import ProtocolError
from uplimit.inner.audit import AuditStore
from uplimit.inner.scheduler import Scheduler, SchedulerConfig
from uplimit.models.base import LanguageModel, Logits
from uplimit.wire.frame import FrameConfig, FrameEncoder, Refusal, overhead_per_token
from uplimit.wire.request import GenerationRequest
from uplimit.wire.streams import StreamSpec, StreamState

if TYPE_CHECKING:  # the rotation imports torch: only services that rotate pay for it
    from uplimit.inner.rotation import GaugeRotation

__all__ = ["InnerService"]

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05  # how long the generation thread sleeps when there is nothing to do


class InnerService:
    def __init__(
        self,
        strong: LanguageModel,
        weak: LanguageModel,
        calibration: Calibration,
        config: SchedulerConfig,
        *,
        audit: AuditStore | None = None,
        best_of: int = 1,
        scheduler: Callable[..., Scheduler] = Scheduler,
        rotation: GaugeRotation | None = None,
    ) -> None:
        """`scheduler` builds the scheduler (`uplimit.redteam` swaps in a dishonest one)."""
        self.config = config
        self.best_of = best_of  # for streams opened without options
        self.frame_config = FrameConfig(
            config.frame_tokens, weak.info.n_vocab, withheld_counts=config.reasoning is not None
        )
        drafter = weak if config.draft_tokens else None  # its own session: see inner/draft.py
        # The weak model also guides compression-aware decoding (tie_nats, tilt), its own twins.
        self.scheduler = scheduler(strong, config, audit=audit, drafter=drafter, guide=weak)
        # With a rotation, `strong` is its current copy, swapped between steps (`step`).
        self.rotation = rotation
        if rotation is not None:
            self.scheduler.gauge_id = rotation.current.gauge_id
        max_weak_context = config.max_context + 1
        self._weak_session = weak.session(config.max_streams, max_weak_context)
        self.encoder = FrameEncoder(
            self._weak_session, weak.info.eos_ids, calibration, self.frame_config
        )
        self.encoder.observe = self._observe
        self._bits: dict[int, float] = defaultdict(float)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.failure: BaseException | None = None  # why the generation thread stopped
        self.frames = 0
        self.uploaded_bytes = 0

    # --- FrameSource ----------------------------------------------------------------------

    def open_stream(self, spec: StreamSpec, extra: bytes = b"") -> None:
        """A stream from the transport: the spec, and the request's options in `extra` (a
        client that sends none gets the configured best_of and no stop sequences). Options
        that fail the inner's checks refuse this stream alone (`wire.frame.Refusal`)."""
        self.encoder.add_stream(spec)
        try:
            if extra:
                request = GenerationRequest.from_extra(spec, extra)
            else:
                request = GenerationRequest(spec, f"stream-{spec.stream_id}", best_of=self.best_of)
        except ProtocolError as e:
            log.warning("stream %d refused: %s", spec.stream_id, e)
            self.scheduler.refuse(spec, Refusal.INVALID)
            return
        self.scheduler.submit(request)

    def cancel(self, stream_id: int) -> None:
        self.scheduler.cancel(stream_id)

    def switch_weak(self, weak: LanguageModel, calibration: Calibration) -> None:
        """Code the streams opened from now on with `weak` (a rollout, `link.rollout`); the
        running ones finish on theirs. The service owns `weak` from here and closes it when
        its last stream has left. Speculative drafts keep the weak model the service started
        with (until a restart): output stays an exact sample of the strong model either way,
        but which one depends on the drafter (inner/draft.py). The guide of compression-aware
        decoding stays on it too: after a rollout its guesses are no longer quite the
        decoder's, which costs bits, never exactness of the round trip."""
        session = weak.session(self.config.max_streams, self.config.max_context + 1)

        def release() -> None:
            session.close()
            weak.close()

        self.encoder.switch(session, calibration, release)

    def next_frame(self) -> bytes | None:
        if self.failure is not None:
            raise self.failure  # the serving loop ends the link with END(error)
        frame = self.scheduler.take_frame()
        if frame is None:
            return None
        data, stats = self.encoder.encode(frame.content)
        self.frames += 1
        self.uploaded_bytes += len(data)
        overhead = overhead_per_token(len(data), stats.token_bits, stats.tokens)
        for sid, toks in frame.content.tokens.items():
            self._bits[sid] += overhead * len(toks)
        for sid in frame.retired:
            self.scheduler.release(sid, self._bits.pop(sid, 0.0))
        return data

    def resend(self, first: int) -> list[bytes]:
        frames = self.encoder.resend(first)
        self.uploaded_bytes += sum(map(len, frames))
        return frames

    def _observe(self, state: StreamState, logits: Logits, pred: Prediction, token: int) -> None:
        self._bits[state.spec.stream_id] += cost_bits(pred, token)

    # --- the generation thread ------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._generate, name="uplimit-generate")
        self._thread.start()

    def _generate(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.step():
                    self.scheduler.wait_for_work(_IDLE_WAIT_S)
        except BaseException as e:  # surfaces at the next tick: the link ends, fail closed
            self.failure = e

    def step(self) -> bool:
        """One scheduler step (False: nothing to do). With a rotation, once the next gauge's
        copy is due, no candidate starts, and the model is swapped before the step after the
        running ones have finished on the old copy (inner/rotation.py)."""
        due = self.rotation.poll() if self.rotation is not None else None
        if due is not None:
            self.scheduler.hold_starts = True
            if not self.scheduler.busy:
                self.rotation.switched(self.scheduler.swap_model(due.model, due.gauge_id))
        return self.scheduler.step()

    def close(self) -> None:
        """Stop generating and free the models' sessions."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.scheduler.close()
        self.encoder.close()
        self._weak_session.close()
