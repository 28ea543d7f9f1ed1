"""Upper bounds on every number a job spec carries, so no spec can overflow a column or another job's budget.

Each int and float field of the spec has a default bound (`maximum` in the field table, jobs/fields.py;
listed in jobs/examples/reference.yaml). An operator changes them with a YAML or JSON file of
`field: highest accepted value` (`PREFIXD_SPEC_BOUNDS=/etc/prefixd/bounds.yaml`, or `spec_bounds` in
OrchestratorConfig):

    training.steps: 20000            # lower than the default 100000
    training.examples_per_step: 64
    prefix.num_virtual_tokens: 1024  # higher, up to the field's ceiling (8192)

    bounds = SpecBounds.from_file("bounds.yaml")
    parse_spec(obj, base_dir=root, bounds=bounds)   # "training.steps: must be >= 1 and <= 20000, got 50000"

A bound may be lowered freely (not below the field's minimum) and raised only up to the field's ceiling
(the store's 32-bit integer columns for step counts, a sane memory limit for sizes).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jobs.fields import numeric_fields

BOUNDS_ENV = "PREFIXD_SPEC_BOUNDS"


@dataclass(frozen=True)
class SpecBounds:
    """The operator's bounds: dotted field path -> highest accepted value; fields not named keep their default.

    SpecBounds({"training.steps": 20000}).maximum("training.steps") == 20000
    """

    overrides: Mapping[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = check_bounds(self.overrides)
        if problems:
            raise ValueError("spec bounds: " + "; ".join(problems))
        object.__setattr__(self, "overrides", dict(self.overrides))

    def maximum(self, path: str) -> float | None:
        """The highest value accepted for the field at `path` (None: the field has no upper bound)."""
        if path in self.overrides:
            return self.overrides[path]
        rule = numeric_fields().get(path)
        return None if rule is None else rule.maximum

    def exceeded(self, stored: Mapping[str, Any]) -> list[str]:
        """What a stored spec (`JobSpec.to_dict()` output, trusted and not re-validated) carries over the
        bounds in force, each as "field: value over the bound B". A job queued under looser bounds, or
        written to the store by other means, is refused by this before it can reach a worker's columns.

        SpecBounds({"training.steps": 100}).exceeded({"training": {"steps": 500}})
        -> ["training.steps: 500 is over the bound 100"]
        """
        problems = []
        for path in numeric_fields():
            value: Any = stored
            for key in path.split("."):
                value = value.get(key) if isinstance(value, Mapping) else None
            bound = self.maximum(path)
            if isinstance(value, int | float) and not isinstance(value, bool) and bound is not None:
                if not value <= bound:  # NaN is over every bound too
                    problems.append(f"{path}: {value!r} is over the bound {bound:g}")
        return problems

    def table(self) -> dict[str, float | None]:
        """Every numeric field with the bound in force, e.g. for documentation or `prefixd schema`."""
        return {path: self.maximum(path) for path in numeric_fields()}

    @classmethod
    def from_file(cls, path: str | Path) -> SpecBounds:
        """Read `field: value` pairs from a YAML or JSON file; ValueError names the file and every problem."""
        from jobs.problems import SpecError
        from jobs.reader import read_spec_file

        try:
            data = read_spec_file(Path(path).expanduser())
        except SpecError as e:
            raise ValueError(f"spec bounds: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"spec bounds: {path} must map field paths to numbers, e.g. 'training.steps: 20000'")
        try:
            return cls(data)
        except ValueError as e:
            raise ValueError(f"{e} (in {path})") from None


def check_bounds(overrides: Any) -> list[str]:
    """Every problem with an operator's bounds mapping, each naming the field, the value and what is accepted."""
    if not isinstance(overrides, Mapping):
        return [f"expected a mapping of field paths to numbers, got {type(overrides).__name__}"]
    fields = numeric_fields()
    problems = []
    for path, value in overrides.items():
        rule = fields.get(path)
        if rule is None:
            problems.append(f"{path}: not a numeric field of the job spec; accepted: {', '.join(fields)}")
            continue
        if rule.maximum is None:
            problems.append(f"{path}: its range is fixed; no bound can be set for it")
            continue
        wanted = int if rule.kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            problems.append(f"{path}: expected {'an integer' if rule.kind == 'int' else 'a number'}, got {value!r}")
            continue
        ceiling = rule.ceiling if rule.ceiling is not None else rule.maximum
        low = rule.minimum if rule.minimum is not None else rule.exclusive_minimum
        if ceiling is not None and value > ceiling:
            problems.append(f"{path}: {value!r} is over the field's ceiling {ceiling:g}")
        elif low is not None and value < low:
            problems.append(f"{path}: {value!r} is under the field's minimum {low:g}")
    return problems
