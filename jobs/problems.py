"""What is wrong with a job spec: `Problem` (one field) and `SpecError` (all of them at once).

raise SpecError("capitals.yaml", [Problem("training.steps", "must be >= 1, got 0")])
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a spec: `path` is the dotted field path ('data.train'), '' for the whole file."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(ValueError):
    """A job spec that cannot be accepted; `.problems` holds every problem found, not just the first."""

    def __init__(self, source: str, problems: list[Problem]):
        self.source = source
        self.problems = list(problems)
        n = len(self.problems)
        lines = [f"{source}: {n} problem{'s' if n != 1 else ''} in the job spec"]
        lines += [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))

    def __reduce__(self):  # keep .source and .problems across pickling (Ray ships exceptions between processes)
        return SpecError, (self.source, self.problems)
