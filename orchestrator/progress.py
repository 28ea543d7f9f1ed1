"""The live view of `prefixd run`: one line per job with step/total, loss, tokens/s and ETA.

On a terminal the block of lines is redrawn in place; otherwise (a pipe, a log file, CI) a plain line is
printed when a job changes state, and at most every `every_s` seconds while it trains.

    view = ProgressView(sys.stdout)
    orchestrator.run_until_empty(progress_callback=view)
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from orchestrator.store import FINAL_STATES, Job


class ProgressView:
    """Callable with the current job rows (the scheduler's progress_callback)."""

    def __init__(
        self, stream: TextIO | None = None, *, tty: bool | None = None, every_s: float = 10.0, clock=time.monotonic
    ):
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty() if tty is None else tty
        self.every_s = every_s
        self._clock = clock
        self._drawn = 0  # lines of the last redraw (terminal)
        self._printed: dict[str, tuple[str, int | None, float]] = {}  # id -> (state, step, time) last printed
        self._first: dict[str, tuple[int, float]] = {}  # id -> (step, time) when first seen training

    def __call__(self, jobs: list[Job]) -> None:
        now = self._clock()
        for job in jobs:
            if job.state == "running" and job.step is not None and job.id not in self._first:
                self._first[job.id] = (job.step, now)
        if self.tty:
            self._redraw(jobs, now)
        else:
            self._plain(jobs, now)
        self.stream.flush()

    def _redraw(self, jobs: list[Job], now: float) -> None:
        lines = [self.line(j, now) for j in jobs] or ["no jobs"]
        if self._drawn:
            self.stream.write(f"\x1b[{self._drawn}F\x1b[J")  # back to the block's first line, clear below
        self.stream.write("\n".join(lines) + "\n")
        self._drawn = len(lines)

    def _plain(self, jobs: list[Job], now: float) -> None:
        for job in jobs:
            last = self._printed.get(job.id)
            changed = last is None or last[0] != job.state
            due = job.state == "running" and last is not None and job.step != last[1] and now - last[2] >= self.every_s
            if changed or due:
                self.stream.write(self.line(job, now) + "\n")
                self._printed[job.id] = (job.state, job.step, now)

    def line(self, job: Job, now: float | None = None) -> str:
        """`name  id  state  step/total  loss  tokens/s  ETA` (the parts that are known)."""
        now = self._clock() if now is None else now
        parts = [f"{job.task:<20}", job.id, f"{job.state:<9}"]
        if job.total_steps:
            parts.append(f"step {job.step or 0}/{job.total_steps}")
        if job.loss is not None:
            parts.append(f"loss {job.loss:.4f}")
        if job.state == "running" and job.tokens_per_s:
            parts.append(f"{job.tokens_per_s:,.0f} tok/s")
        if job.state == "running":
            parts.append(f"ETA {format_duration(self.eta_s(job, now))}")
        if job.state in FINAL_STATES and job.error:
            parts.append(f"error: {job.error.splitlines()[0]}")
        elif job.state == "queued" and job.waiting:
            parts.append(f"({job.waiting})")
        elif job.state == "queued" and job.attempts:
            parts.append(
                f"(attempt {job.attempts} of {job.max_attempts} ended: {(job.error or '').splitlines()[0]})"
                if job.error
                else f"(after attempt {job.attempts})"
            )
        if job.state == "succeeded" and job.result_dir:
            parts.append(f"-> {job.result_dir}")
        return "  ".join(parts)

    def eta_s(self, job: Job, now: float) -> float | None:
        """Seconds left at the step rate seen since this view first saw the job train; None if unknown."""
        if job.step is None or not job.total_steps or job.id not in self._first:
            return None
        step0, t0 = self._first[job.id]
        if job.step <= step0 or now <= t0:
            return None
        rate = (job.step - step0) / (now - t0)
        return max(0.0, (job.total_steps - job.step) / rate)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
