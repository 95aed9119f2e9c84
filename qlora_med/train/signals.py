"""SIGTERM / SIGINT during training: finish the current optimizer step, save a checkpoint, stop, say how to resume.

Schedulers preempt with SIGTERM and people press Ctrl-C; either should cost at most one step. While a stage
trains, :class:`StopOnSignal` (a TrainerCallback) turns the first signal into "save a checkpoint at the end of
this step and stop"; a second one restores the default behaviour (immediate exit). The runner then raises
:class:`Interrupted` instead of writing ``final/``: the stage resumes from that checkpoint when the same
command runs again.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType

from transformers import TrainerCallback

from qlora_med.errors import QloraMedError

logger = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(QloraMedError):
    """Training stopped on a signal after saving a checkpoint."""


class StopOnSignal(TrainerCallback):
    """Install handlers at train begin, request save + stop at the next step end, restore them at train end (and
    in :meth:`restore`, which the runner calls however training ended). A second train begin on the same
    callback (the OOM fallback's retry) keeps the handlers it saved first."""

    def __init__(self) -> None:
        self.received: str | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:  # the second signal: give up on the graceful path
            self.restore()
            signal.raise_signal(signum)
            return
        self.received = name
        logger.warning("%s received: finishing this step, saving a checkpoint, then stopping (send it again to "
                       "stop at once, losing the step)", name)

    def restore(self) -> None:
        """Put back the handlers that were there before train begin (a no-op when none are installed)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def on_train_begin(self, args, state, control, **kwargs):
        if self._previous:  # installed by an earlier attempt of this stage
            return control
        try:
            self._previous = {s: signal.signal(s, self._handle) for s in SIGNALS}
        except ValueError:  # not the main thread (e.g. a notebook worker): keep the default behaviour
            self._previous = {}
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if self.received is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, **kwargs):
        self.restore()
        return control
