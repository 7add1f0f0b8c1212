"""Progress reporting: rich bars on a terminal, plain lines otherwise, nothing with --json."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

Advance = Callable[..., None]  # advance(n=1, info="", total_=None)


class Reporter:
    def __init__(self, *, enabled: bool = True, bars: bool | None = None) -> None:
        self.enabled = enabled
        self.bars = enabled and (sys.stderr.isatty() if bars is None else bars)
        self._progress = None
        if self.bars:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                      TextColumn("{task.fields[info]}"), TimeElapsedColumn(), transient=True)

    def log(self, msg: str) -> None:
        if not self.enabled:
            return
        if self._progress is not None and self._progress.live.is_started:
            self._progress.console.print(msg)
        else:
            print(msg, file=sys.stderr, flush=True)

    @contextmanager
    def task(self, description: str, total: float | None = None) -> Iterator[Advance]:
        """Yield advance(n=1, info="", total=None). Plain mode logs at most every 10 s."""
        if self._progress is None:
            state = {"done": 0.0, "last": time.monotonic()}

            def advance(n: float = 1, info: str = "", total_: float | None = None) -> None:
                nonlocal total
                if total_ is not None:
                    total = total_
                state["done"] += n
                now = time.monotonic()
                if self.enabled and info and now - state["last"] >= 10:
                    state["last"] = now
                    of = f"/{int(total)}" if total else ""
                    self.log(f"  {description}: {int(state['done'])}{of} {info}")

            yield advance
            return
        progress = self._progress
        with progress:
            tid = progress.add_task(description, total=total, info="")

            def advance(n: float = 1, info: str = "", total_: float | None = None) -> None:
                if total_ is not None:
                    progress.update(tid, total=total_)
                progress.update(tid, advance=n, info=info)

            try:
                yield advance
            finally:
                progress.remove_task(tid)
