"""Progress reporting for the training loop: a rich bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total_epochs: int, steps_per_epoch: int, console: Console | None = None,
                 enabled: bool = True):
        self.console = console or Console(stderr=True, emoji=False)
        self.enabled = enabled
        self.live = enabled and self.console.is_terminal
        self.total_epochs = total_epochs
        self.steps_per_epoch = steps_per_epoch
        self._progress: Progress | None = None
        self._task: Any = None
        self._fit_start = time.perf_counter()

    def start_epoch(self, epoch: int) -> None:
        self._epoch_start = time.perf_counter()
        if self.live:
            if self._progress is None:
                self._progress = Progress(
                    TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[stats]}"), TimeRemainingColumn(),
                    console=self.console, transient=False)
                self._progress.start()
            self._task = self._progress.add_task(
                f"epoch {epoch + 1}/{self.total_epochs}", total=self.steps_per_epoch, stats="")

    def update(self, step_in_epoch: int, loss: float, images_per_second: float, lr: float) -> None:
        if self.live and self._progress is not None:
            self._progress.update(self._task, completed=step_in_epoch,
                                  stats=f"loss {loss:.4f}  {images_per_second:.1f} img/s  lr {lr:.2e}")

    def end_epoch(self, epoch: int, summary: dict[str, Any], epochs_done_this_run: int,
                  budget_left_seconds: float | None = None) -> None:
        if not self.enabled:
            return
        self.message(self.epoch_line(epoch, summary, epochs_done_this_run, budget_left_seconds))

    def epoch_line(self, epoch: int, summary: dict[str, Any], epochs_done_this_run: int,
                   budget_left_seconds: float | None = None) -> str:
        elapsed = time.perf_counter() - self._fit_start
        remaining = elapsed / max(1, epochs_done_this_run) * (self.total_epochs - epoch - 1)
        if budget_left_seconds is not None:
            # A time budget ends the run before the last epoch when it is the tighter limit.
            remaining = min(remaining, max(0.0, budget_left_seconds))
        parts = [f"epoch {epoch + 1}/{self.total_epochs}"]
        for key, value in summary.items():
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        parts.append(f"eta {remaining / 60:.1f} min")
        return "  ".join(parts)

    def message(self, text: str) -> None:
        if self.enabled:
            (self._progress.console.print(text) if self.live and self._progress else
             print(text, file=sys.stderr, flush=True))

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
