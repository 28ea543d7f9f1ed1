"""A spec's `sweep:` section: one job spec becomes several variants, each trained as its own job.

    sweep:
      method: grid                  # grid: every combination; random: `count` distinct draws
      parameters:
        training.learning_rate: [1.0e-3, 3.0e-3, 1.0e-2]
        prefix.num_virtual_tokens: [10, 20]

    variants = expand_sweep(document)   # [(label, document without `sweep`), ...], 6 here
    variants[0][0] == "training.learning_rate=0.001 prefix.num_virtual_tokens=10"

Only the fields in SWEEPABLE may vary. Each variant is then validated as any spec is (so the operator's
bounds apply to every value), keeps the spec's `name` (all versions of one registered model, where the best
by the registry metric becomes champion), and is queued as its own job, linked to the others by the sweep
id (`new_sweep_id`) and its label, which the job store keeps with it.
"""

from __future__ import annotations

import copy
import itertools
import random
import secrets
from collections.abc import Mapping
from typing import Any

from jobs.problems import Problem, SpecError

SWEEPABLE = (
    "training.learning_rate",
    "training.schedule",
    "training.warmup_steps",
    "training.weight_decay",
    "training.seed",
    "prefix.num_virtual_tokens",
    "prefix.projection",
    "prefix.projection_hidden_size",
    "prefix.init",
)
METHODS = ("grid", "random")
MAX_VARIANTS = 64
"""Most variants one sweep may make: they all train as co-tenants of one group."""
_KEYS = ("method", "parameters", "count", "seed")


def expand_sweep(document: Any, source: str = "<spec>") -> list[tuple[str | None, Any]]:
    """The variants of a parsed spec document: [(label, document)], or [(None, document)] without `sweep`.

    Raises SpecError naming every problem of the sweep section (paths under `sweep.`). The documents are
    not validated here: each goes through the spec's own validation next.
    """
    if not isinstance(document, Mapping) or "sweep" not in document:
        return [(None, document)]
    base = {k: v for k, v in document.items() if k != "sweep"}
    sweep = document["sweep"]
    problems: list[Problem] = []
    if not isinstance(sweep, Mapping):
        raise SpecError(source, [Problem("sweep", f"expected a mapping with {', '.join(_KEYS)}")])
    for key in sweep:
        if key not in _KEYS:
            problems.append(Problem(f"sweep.{key}", f"unknown key; accepted: {', '.join(_KEYS)}"))
    method = sweep.get("method", "grid")
    if method not in METHODS:
        problems.append(Problem("sweep.method", f"must be one of {', '.join(METHODS)}, got {method!r}"))
    grid = _parameters(sweep.get("parameters"), problems)
    count = sweep.get("count")
    seed = sweep.get("seed", 0)
    if method == "random" and count is None:
        problems.append(Problem("sweep.count", "required with method random: how many variants to draw"))
    if count is not None and not (isinstance(count, int) and not isinstance(count, bool) and 1 <= count):
        problems.append(Problem("sweep.count", f"must be an integer >= 1, got {count!r}"))
        count = None
    if not (isinstance(seed, int) and not isinstance(seed, bool) and seed >= 0):
        problems.append(Problem("sweep.seed", f"must be an integer >= 0, got {seed!r}"))
    if problems:
        raise SpecError(source, problems)
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    if method == "random":
        combos = random.Random(seed).sample(combos, min(count, len(combos)))
    elif count is not None and count < len(combos):
        raise SpecError(source, [Problem("sweep.count", f"the grid has {len(combos)} variants, over count {count}")])
    if len(combos) > MAX_VARIANTS:
        raise SpecError(source, [Problem("sweep", f"{len(combos)} variants; at most {MAX_VARIANTS} per sweep")])
    return [(_label(c), _with(base, c)) for c in combos]


def job_entries(variants: list[tuple[str | None, Any]], **common: Any) -> list[dict[str, Any]]:
    """What the job store queues for parsed variants (`jobs.spec.parse_specs`): one entry a variant, linked
    by a fresh sweep id when they come from a sweep; `common` (max_attempts, tenant) goes into each.

        store.submit_many(job_entries(parse_specs(doc, base_dir=root), tenant="alice", max_attempts=3))
    """
    sweep_id = new_sweep_id() if variants and variants[0][0] is not None else None
    return [
        {
            "spec": spec.to_dict(),
            "task": spec.name,
            "base_key": spec.base_model.base_key,
            "priority": spec.priority,
            "sweep_id": sweep_id,
            "sweep_variant": label,
        }
        | common
        for label, spec in variants
    ]


def new_sweep_id() -> str:
    """A fresh sweep id: 'sweep-' and 12 hex digits."""
    return f"sweep-{secrets.token_hex(6)}"


def _parameters(raw: Any, problems: list[Problem]) -> dict[str, list]:
    if not isinstance(raw, Mapping) or not raw:
        problems.append(Problem("sweep.parameters", "expected a mapping of field paths to lists of values"))
        return {}
    grid = {}
    for path, values in raw.items():
        where = f"sweep.parameters.{path}"
        if path not in SWEEPABLE:
            problems.append(Problem(where, f"cannot be swept; accepted: {', '.join(SWEEPABLE)}"))
        elif not isinstance(values, list) or not values:
            problems.append(Problem(where, f"expected a non-empty list of values, got {values!r}"))
        elif len({repr(v) for v in values}) != len(values):
            problems.append(Problem(where, "lists a value twice"))
        else:
            grid[path] = list(values)
    return grid


def _label(combo: Mapping[str, Any]) -> str:
    return " ".join(f"{path}={_shown(v)}" for path, v in combo.items())


def _shown(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else f"{value:g}" if isinstance(value, float) else str(value)


def _with(base: Mapping[str, Any], combo: Mapping[str, Any]) -> dict:
    doc = copy.deepcopy(dict(base))
    for path, value in combo.items():
        section, key = path.split(".")
        if not isinstance(doc.get(section), Mapping):
            doc[section] = {}
        doc[section] = dict(doc[section]) | {key: value}
    return doc
