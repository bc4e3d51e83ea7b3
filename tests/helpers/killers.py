"""Test-only Lightning callbacks that kill their own process (SIGKILL: no cleanup, no handlers) at a
chosen moment, once: a marker file records the kill, so the restarted run goes on."""

import os
import signal
from pathlib import Path

from pytorch_lightning.callbacks import Callback


class KillAt(Callback):
    """SIGKILL this process once (unless ``marker`` exists): after training step ``step`` (a global
    step) when it is given, else when testing starts (after fit, before metrics.json)."""

    def __init__(self, marker: str, step: int | None = None):
        self.step, self.marker = step, Path(marker)

    def _kill(self, trainer) -> None:
        if not self.marker.exists():
            self.marker.write_text(f"killed at step {trainer.global_step}, epoch {trainer.current_epoch}\n")
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.step is not None and trainer.global_step == self.step:
            self._kill(trainer)

    def on_test_start(self, trainer, pl_module) -> None:
        if self.step is None:
            self._kill(trainer)
