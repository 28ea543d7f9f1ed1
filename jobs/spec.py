"""Job specs: what a user asks prefixd to train, parsed and validated once, where it enters.

A job spec is a YAML (or JSON) file describing one task: the frozen base model, the task's data, the
prefix to train, how long to train it, and where to register the result. `load_spec(path)` reads one
and returns a `JobSpec` (frozen dataclasses); code past that point trusts it. Every field, with its
default, and the rules beyond types:

    # Run: prefixd submit my_task.yaml
    name: capitals                # required; ^[a-z0-9][a-z0-9_-]{0,62}$: names files and the MLflow model
    base_model:                   # exactly one of builtin / path / hub
      builtin: smollm2-135m       #   a name in jobs.builtin_models.BUILTIN_MODELS
      # path: models/my-llama     #   a local folder holding config.json (save_pretrained layout)
      # hub: {id: org/name, revision: 0123abcd}   # revision (branch, tag or commit) is required
      dtype: float32              # float32 | bfloat16 | float16
    data:
      train: capitals.jsonl       # required; .jsonl/.json, .csv, .parquet, or a save_to_disk folder;
                                  #   or a storage URI, s3://bucket/key (not in specs sent to a server)
      validation: null            # optional; else validation_fraction of train is held out
      format: auto                # auto | jsonl | csv | parquet | arrow
      template: "The capital of {country} is"   # exactly one of template / input_column;
      # input_column: prompt      #   each {placeholder} must be a column of the data
      target_column: capital      # required: the text the model learns to produce
      max_length: 256             # tokens per example (prompt + target + eos), 8..32768
      truncation: left            # left (drop prompt tokens from the left) | skip (drop the row) | error
      validation_fraction: 0.1    # 0 < x < 0.5, used only without a validation file
      seed: 0                     # seed of the held-out split, 0..2147483647
    prefix:
      num_virtual_tokens: 10      # 1..512, and fewer than the model's context
      projection: false           # reparameterise the prefix through an MLP while training
      projection_hidden_size: 512 # hidden width of that MLP (ignored without projection), 1..2048
      init: random                # random | zero
    training:                     # required, with exactly one of steps / epochs
      steps: 60                   # optimizer steps, 1..100000 ...
      # epochs: 3                 # ... or passes over the train data, 0 < x <= 100
      examples_per_step: 8        # 1..256
      learning_rate: 0.005        # 0 < lr <= 1
      schedule: constant          # constant | linear | cosine (after warmup)
      warmup_steps: 0             # 0..100000, and <= steps
      weight_decay: 0.0           # 0..1
      max_grad_norm: 1.0          # 0 < x <= 10000, or null for no clipping
      seed: 0                     # 0..2147483647
      eval_every: 50              # steps, 1..100000
      checkpoint_every: 50        # steps, 1..100000
      eval_generation: {enabled: false, samples: 32, max_new_tokens: 32}   # samples 1..512, tokens 1..1024
    priority: 0                   # -1000..1000, higher runs first (a tenant's quota may allow less)
    registry:
      model_name: null            # default: "prefixd-<name>"
      metric: eval_loss           # eval_loss | eval_perplexity | exact_match | bleu | rouge_l
      direction: null             # default: minimize for eval_loss/eval_perplexity, else maximize
      experiment: null            # MLflow experiment; null: the operator's default
      register: true
    tags: {team: nlp}             # str -> str, at most 100; keys ^[A-Za-z0-9_.-]{1,64}$ not starting with
                                  # 'prefixd.' (reserved for the registry's own tags), values <= 256 characters

Relative paths (data.train, data.validation, base_model.path) are resolved against the spec file's folder
and stored absolute. At submit the data files must exist and hold every column the spec names, and the
prefix (plus data.max_length) must fit the model's context: a built-in model's `context_length`, or a
local folder's config.json (`max_position_embeddings`, else `n_positions`, else `max_target_positions`;
none of them, as in T5: no limit). Hub models are checked when a worker loads them.

Bounds. Every number above has an upper bound; the ranges shown are the defaults. An operator changes
them with a file of `field: highest value` (jobs/bounds.py; PREFIXD_SPEC_BOUNDS=bounds.yaml), lowering
any, raising one only up to its ceiling (32-bit for step counts, the store's integer columns). A value
past its bound is refused naming the field, the value and the bound: "training.steps: must be >= 1 and
<= 100000, got 5000000000".

Refused at the entry (jobs/reader.py reads spec files and HTTP request bodies alike): unknown keys at any
level (the error lists the accepted ones), wrong types (a boolean is not an integer; "10" is not a
number), NaN and infinities, more than 1 MiB, non-UTF-8 or binary text, empty documents, a document that
is not a mapping, duplicate keys, explicit YAML tags (`!!python/...`, `!!int`, `!include`: all of them),
more than 32 levels of nesting, more than 10,000 values (or aliases that expand past that), and integers
of more than 64 digits. YAML is read with YAML 1.2's core schema: `1e-3` is a number, `yes`, `on` and
`2024-01-01` are strings. A spec only chooses among fixed options: it never names code to import or run
(hence no `trust_remote_code`: that is an operator setting).

Over the HTTP API, paths are relative to the server's data root and must exist inside it (links
followed); any other path, existing or not, gets one answer that says nothing about it, and refusals
never quote a data file's contents.

Every problem is reported at once, each with its path in the file:

    SpecError: capitals.yaml: 2 problems in the job spec
      data.train: no such file 'capitals.jsonl' (looked for /home/me/specs/capitals.jsonl)
      training.steps: must be >= 1 and <= 100000, got 0

The JSON Schema from `spec_json_schema()` (also in jobs/schema.json, for editors) is generated from the
same field table as the validator; `parse_spec` remains the authority (files, columns, context and the
operator's bounds are beyond a schema). Write it with `python -m jobs.spec > jobs/schema.json`.

Modules: jobs/fields.py (the field table), jobs/reader.py (reading documents), jobs/validate.py
(checking them), jobs/bounds.py (the operator's bounds), jobs/spec_schema.py (JSON Schema); this module
is the entry point and the reference.
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
    every path must exist inside it, checked before any file is opened (jobs/validate.py). `bounds`: the
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
