"""Job specs: what a user asks prefixd to train, parsed and validated once, where it enters.

    spec = load_spec("jobs/examples/capitals.yaml")   # a frozen JobSpec, or SpecError listing every problem

Every field, with its default and accepted values, is in `jobs/examples/reference.yaml`; `prefixd schema`
prints the JSON Schema (jobs/schema.json, written with `python -m jobs.spec > jobs/schema.json`), which
`parse_spec` backs with what a schema cannot check (files, columns, context, the operator's bounds).
The field table is jobs/fields.py; reading is jobs/reader.py, checking jobs/validate.py (files: jobs/validate_data.py), bounds jobs/bounds.py.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from jobs.bounds import SpecBounds
from jobs.fields import (  # noqa: F401 - the spec's public names live here too
    CONTEXT_KEYS,
    HUB_ID_PATTERN,
    HUB_REVISION_PATTERN,
    LOWER_IS_BETTER,
    METRICS,
    NAME_PATTERN,
    NAME_RULE,
    REGISTERED_NAME_PREFIX,
    RESERVED_TAG_PREFIX,
    TAG_KEY_PATTERN,
    TAG_VALUE_MAX,
    BaseModelSpec,
    DataSpec,
    EvalGenerationSpec,
    HubModel,
    JobSpec,
    PrefixSpec,
    RegistrySpec,
    Tags,
    TrainingSpec,
    _build,
)
from jobs.problems import Problem, SpecError  # noqa: F401
from jobs.reader import MAX_SPEC_BYTES, MAX_YAML_NODES, parse_document, read_spec_file  # noqa: F401
from jobs.spec_schema import spec_json_schema  # noqa: F401
from jobs.sweep import expand_sweep
from jobs.validate import check_document


def load_spec(path: str | Path, *, bounds: SpecBounds | None = None) -> JobSpec:
    """Read, parse and validate the YAML (or, for a .json suffix, JSON) job spec at `path`.

    Relative paths in it are resolved against the file's folder. Raises SpecError listing every problem.
    """
    path = Path(path)
    obj = read_spec_file(path, str(path))
    return parse_spec(obj, base_dir=path.resolve().parent, source=str(path), bounds=bounds)


def load_specs(path: str | Path, *, bounds: SpecBounds | None = None) -> list[tuple[str | None, JobSpec]]:
    """`load_spec` for a file that may carry a `sweep:` section: [(variant label, JobSpec)] (`parse_specs`)."""
    path = Path(path)
    obj = read_spec_file(path, str(path))
    return parse_specs(obj, base_dir=path.resolve().parent, source=str(path), bounds=bounds)


def parse_spec(
    obj: Any,
    *,
    base_dir: Path,
    source: str = "<spec>",
    data_root: Path | None = None,
    bounds: SpecBounds | None = None,
    files: Callable[[str], str | None] | None = None,
) -> JobSpec:
    """Validate an already-parsed spec (e.g. a request body read by `parse_document`) as a JobSpec.

    `base_dir` anchors relative paths; `source` names the spec in errors. With `data_root` (a server),
    every path must exist inside it, checked before any file is opened (jobs/validate_data.py). `bounds`: the
    operator's upper bounds (default: the field table's). Checks that the data files hold the named
    columns and that the prefix fits the model. `files` (a server): resolves an uploaded file's id
    ('file-<hex>') named in data.train / data.validation to its storage path, None when unknown. Raises SpecError.

        parse_spec({"name": "t", ...}, base_dir=root, data_root=root, source="request body")
    """
    values = check_document(obj, base_dir=base_dir, source=source, data_root=data_root, bounds=bounds, files=files)
    return _build(JobSpec, values)


def parse_specs(
    obj: Any, *, base_dir: Path, source: str = "<spec>", **options: Any
) -> list[tuple[str | None, JobSpec]]:
    """`parse_spec` for a document that may carry a `sweep:` section (jobs/sweep.py): [(label, JobSpec)] per
    variant, [(None, spec)] without one. Every variant is validated; a problem of a swept value is named at
    its place in the sweep (`sweep.parameters.training.learning_rate: ...`), the others once.

        parse_specs(yaml_document, base_dir=folder)   # 6 (label, JobSpec) pairs for a 3 x 2 grid
    """
    variants = expand_sweep(obj, source)
    if variants[0][0] is None:
        return [(None, parse_spec(obj, base_dir=base_dir, source=source, **options))]
    swept = set(obj["sweep"]["parameters"])
    out, problems = [], []
    for label, document in variants:
        try:
            out.append((label, parse_spec(document, base_dir=base_dir, source=source, **options)))
        except SpecError as e:
            for p in e.problems:
                problem = Problem(f"sweep.parameters.{p.path}", p.message) if p.path in swept else p
                if problem not in problems:
                    problems.append(problem)
    if problems:
        raise SpecError(source, problems)
    return out


if __name__ == "__main__":
    json.dump(spec_json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
