"""A rich progress bar on stderr for training: step, loss, views per second (the epoch
summaries are the trainer's log lines)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RichTrainProgress:
    """Implements trainer.train.Progress; use as a context manager around train()."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.bar = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[rate]:.1f} views/s"),
            TimeElapsedColumn(), TimeRemainingColumn(), console=self.console, transient=True,
        )
        self.task: TaskID | None = None

    def __enter__(self) -> RichTrainProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def start_epoch(self, epoch: int, epochs: int, steps: int) -> None:
        if self.task is not None:
            self.bar.remove_task(self.task)
        self.task = self.bar.add_task("train", total=steps, epoch=f"{epoch}/{epochs}",
                                      loss=float("nan"), rate=0.0)

    def advance(self, loss: float, views_per_s: float) -> None:
        if self.task is not None:
            self.bar.update(self.task, advance=1, loss=loss, rate=views_per_s)

    def end_epoch(self, entry: dict[str, Any]) -> None:
        # The trainer logs each epoch's line (INFO); printing it here too doubled it.
        del entry
