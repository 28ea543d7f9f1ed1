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
      train: capitals.jsonl       # required; .jsonl/.json, .csv, .parquet, or a save_to_disk folder
      validation: null            # optional; else validation_fraction of train is held out
      format: auto                # auto | jsonl | csv | parquet | arrow
      template: "The capital of {country} is"   # exactly one of template / input_column;
      # input_column: prompt      #   each {placeholder} must be a column of the data
      target_column: capital      # required: the text the model learns to produce
      max_length: 256             # tokens per example (prompt + target + eos), >= 8
      truncation: left            # left (drop prompt tokens from the left) | skip (drop the row) | error
      validation_fraction: 0.1    # 0 < x < 0.5, used only without a validation file
      seed: 0                     # seed of the held-out split
    prefix:
      num_virtual_tokens: 10      # 1..512, and fewer than the model's context
      projection: false           # reparameterise the prefix through an MLP while training
      projection_hidden_size: 512 # hidden width of that MLP (ignored without projection)
      init: random                # random | zero
    training:                     # required, with exactly one of steps / epochs
      steps: 60                   # optimizer steps (int >= 1) ...
      # epochs: 3                 # ... or passes over the train data (number > 0)
      examples_per_step: 8
      learning_rate: 0.005        # 0 < lr <= 1
      schedule: constant          # constant | linear | cosine (after warmup)
      warmup_steps: 0             # <= steps
      weight_decay: 0.0
      max_grad_norm: 1.0          # > 0, or null for no clipping
      seed: 0
      eval_every: 50              # steps
      checkpoint_every: 50        # steps
      eval_generation: {enabled: false, samples: 32, max_new_tokens: 32}
    priority: 0                   # -1000..1000, higher runs first
    registry:
      model_name: null            # default: "prefixd-<name>"
      metric: eval_loss           # eval_loss | eval_perplexity | exact_match | bleu | rouge_l
      direction: null             # default: minimize for eval_loss/eval_perplexity, else maximize
      experiment: null            # MLflow experiment; null: the operator's default
      register: true
    tags: {team: nlp}             # str -> str; keys ^[A-Za-z0-9_.-]{1,64}$, values <= 256 characters

Relative paths (data.train, data.validation, base_model.path) are resolved against the spec file's folder
and stored absolute. At submit the data files must exist and hold every column the spec names, and the
prefix (plus data.max_length) must fit the model's context: a built-in model's `context_length`, or a
local folder's config.json (`max_position_embeddings`, else `n_positions`, else `max_target_positions`;
none of them, as in T5: no limit). Hub models are checked when a worker loads them.

Refused at the entry: unknown keys at any level (the error lists the accepted ones), wrong types (a
boolean is not an integer; "10" is not a number), NaN and infinities, files over 1 MiB, non-UTF-8 or
binary files, empty files, a document that is not a mapping, duplicate keys, YAML tags (`!!python/...`
and every other non-plain type), and YAML aliases that expand past 10,000 values. A spec only chooses
among fixed options: it never names code to import or run (hence no `trust_remote_code`: that is an
operator setting).

Every problem is reported at once, each with its path in the file:

    SpecError: capitals.yaml: 2 problems in the job spec
      data.train: no such file 'capitals.jsonl' (looked for /home/me/specs/capitals.jsonl)
      training.steps: must be >= 1, got 0

The JSON Schema from `spec_json_schema()` (also in jobs/schema.json, for editors) is generated from the
same field table as the validator; `parse_spec` remains the authority (files, columns and context are
beyond a schema). Write it with `python -m jobs.spec > jobs/schema.json`.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import inspect
import json
import math
import re
import stat
import string
import sys
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from jobs.builtin_models import BUILTIN_MODELS
from jobs.datafiles import FORMATS, DataFileError, read_column_names

MAX_SPEC_BYTES = 1 << 20  # 1 MiB: a spec is a few hundred bytes; anything near this is a mistake or an attack
MAX_YAML_NODES = 10_000  # values after alias expansion; a full spec has ~80 (caps "billion laughs" bombs)

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
NAME_RULE = "lowercase letters, digits, '-' and '_', starting with a letter or digit, at most 63 characters"
TAG_KEY_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
TAG_VALUE_MAX = 256
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
HUB_REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"
METRICS = ("eval_loss", "eval_perplexity", "exact_match", "bleu", "rouge_l")
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity")
REGISTERED_NAME_PREFIX = "prefixd-"
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_target_positions")

_KEY_HINTS = {
    "trust_remote_code": "trust_remote_code is an operator setting, not part of a job spec "
    "(a spec never chooses to run code from a model repository)",
}


# --- errors ---------------------------------------------------------------------------------------------


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


# --- the field table --------------------------------------------------------------------------------------
# Each dataclass field carries a _Rule; the validator (_check_section) and the JSON Schema
# (_section_schema) both read them, and the per-field docstrings become the schema's descriptions.


@dataclass(frozen=True, kw_only=True)
class _Rule:
    kind: str  # bool | int | float | str | path | section | tags
    choices: tuple[str, ...] = ()
    pattern: str | None = None  # str: the value; tags: each key
    pattern_help: str = ""
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    max_length: int = 4096  # str/path characters; tags: each value. MLflow params hold at most 6000.
    max_items: int = 100  # tags
    nullable: bool = False
    derived: str = ""  # how a default that depends on other fields is chosen
    section: type | None = None


def _f(default: Any = MISSING, kind: str = "str", **rule: Any) -> Any:
    return field(default=default, metadata={"rule": _Rule(kind=kind, **rule)})


def _section(cls: type, *, required: bool = False, nullable: bool = False) -> Any:
    rule = _Rule(kind="section", section=cls, nullable=nullable)
    if required:
        return field(metadata={"rule": rule})
    if nullable:
        return field(default=None, metadata={"rule": rule})
    return field(default_factory=cls, metadata={"rule": rule})


class Tags(Mapping[str, str]):
    """A read-only str -> str mapping, so that a frozen JobSpec stays frozen (and hashable)."""

    def __init__(self, items: Mapping[str, str] | None = None):
        self._items = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"Tags({self._items!r})"


@dataclass(frozen=True, kw_only=True)
class HubModel:
    """A model on the Hugging Face Hub, pinned to a revision."""

    id: str = _f(kind="str", pattern=HUB_ID_PATTERN, pattern_help="'org/name'")
    """Repository id, 'org/name'."""
    revision: str = _f(kind="str", pattern=HUB_REVISION_PATTERN, pattern_help="a branch, tag or commit")
    """Branch, tag or commit to load; a full commit hash makes the job reproducible."""


@dataclass(frozen=True, kw_only=True)
class BaseModelSpec:
    """The frozen base model the prefix is trained for: exactly one of builtin, path, hub."""

    ONE_OF = (("builtin", "path", "hub"),)

    builtin: str | None = _f(None, "str", choices=tuple(BUILTIN_MODELS), nullable=True)
    """Name of a model shipped with prefixd (jobs.builtin_models.BUILTIN_MODELS)."""
    path: Path | None = _f(None, "path", nullable=True)
    """Local model folder holding config.json and weights (save_pretrained layout); stored absolute."""
    hub: HubModel | None = _section(HubModel, nullable=True)
    """A Hugging Face Hub model: {id: 'org/name', revision: '<branch, tag or commit>'}."""
    dtype: str = _f("float32", "str", choices=("float32", "bfloat16", "float16"))
    """Floating-point type the frozen base model's weights are held in."""

    @property
    def base_key(self) -> str:
        """Groups jobs that can share one loaded model: 'builtin:<name>:<dtype>',
        'path:<absolute folder>:<dtype>' or 'hub:<id>@<revision>:<dtype>'."""
        if self.builtin is not None:
            return f"builtin:{self.builtin}:{self.dtype}"
        if self.path is not None:
            return f"path:{self.path}:{self.dtype}"
        assert self.hub is not None
        return f"hub:{self.hub.id}@{self.hub.revision}:{self.dtype}"


@dataclass(frozen=True, kw_only=True)
class DataSpec:
    """The task's examples: where they are and how a row becomes a prompt and a target."""

    ONE_OF = (("input_column", "template"),)

    train: Path = _f(kind="path")
    """Training data: a .jsonl/.json, .csv or .parquet file, or a folder saved with datasets' save_to_disk;
    stored absolute."""
    validation: Path | None = _f(None, "path", nullable=True)
    """Validation data in the same layout; null holds out validation_fraction of train instead."""
    format: str = _f("auto", "str", choices=("auto",) + FORMATS)
    """File format of train and validation; 'auto' tells it from the suffix (a folder is 'arrow')."""
    input_column: str | None = _f(None, "str", max_length=256, nullable=True)
    """Column whose text is the prompt, used as is. Exactly one of input_column and template."""
    template: str | None = _f(None, "str", nullable=True)
    """The prompt as text with {column} placeholders, e.g. "Q: {question}\\nA:"; no separator is added
    before the target, so end it with the one you want. Write a literal brace as {{ or }}."""
    target_column: str = _f(kind="str", max_length=256)
    """Column holding the text the model learns to produce."""
    max_length: int = _f(256, "int", minimum=8)
    """Most tokens in one example: prompt + target + end-of-sequence token."""
    truncation: str = _f("left", "str", choices=("left", "skip", "error"))
    """An example over max_length: 'left' drops prompt tokens from the left so the target fits, 'skip'
    drops the row (and counts it), 'error' fails the job."""
    validation_fraction: float = _f(0.1, "float", exclusive_minimum=0, exclusive_maximum=0.5)
    """Share of train rows held out for validation when no validation file is given (0 < x < 0.5)."""
    seed: int = _f(0, "int", minimum=0)
    """Seed of the held-out split."""


@dataclass(frozen=True, kw_only=True)
class PrefixSpec:
    """The trained prefix: virtual key/value tokens prepended at every layer of the frozen model."""

    num_virtual_tokens: int = _f(10, "int", minimum=1, maximum=512)
    """Prefix length in tokens, per layer; must be fewer than the model's context."""
    projection: bool = _f(False, "bool")
    """Reparameterise the prefix through a two-layer MLP while training (folded away afterwards)."""
    projection_hidden_size: int = _f(512, "int", minimum=1)
    """Hidden width of the projection MLP, in units; ignored unless projection is true."""
    init: str = _f("random", "str", choices=("random", "zero"))
    """Initial prefix values: 'random' (small normal noise) or 'zero'."""


@dataclass(frozen=True, kw_only=True)
class EvalGenerationSpec:
    """Generation on validation rows at each evaluation, for exact_match / bleu / rouge_l."""

    enabled: bool = _f(False, "bool")
    """Generate at each evaluation (needed for the exact_match, bleu and rouge_l metrics)."""
    samples: int = _f(32, "int", minimum=1)
    """Validation rows generated for, per evaluation."""
    max_new_tokens: int = _f(32, "int", minimum=1, maximum=1024)
    """Most tokens generated per row."""


@dataclass(frozen=True, kw_only=True)
class TrainingSpec:
    """How long and how the prefix is optimised: exactly one of steps and epochs."""

    ONE_OF = (("steps", "epochs"),)

    steps: int | None = _f(None, "int", minimum=1, nullable=True)
    """Length of training in optimizer steps."""
    epochs: float | None = _f(None, "float", exclusive_minimum=0, nullable=True)
    """Length of training in passes over the train rows (fractions allowed)."""
    examples_per_step: int = _f(8, "int", minimum=1)
    """Examples per optimizer step (the task's batch size)."""
    learning_rate: float = _f(5e-3, "float", exclusive_minimum=0, maximum=1)
    """Peak learning rate of AdamW (0 < lr <= 1)."""
    schedule: str = _f("constant", "str", choices=("constant", "linear", "cosine"))
    """Learning-rate schedule after warmup: constant, linear decay to 0, or cosine decay to 0."""
    warmup_steps: int = _f(0, "int", minimum=0)
    """Steps of linear warmup from 0 to learning_rate."""
    weight_decay: float = _f(0.0, "float", minimum=0)
    """AdamW decoupled weight decay."""
    max_grad_norm: float | None = _f(1.0, "float", exclusive_minimum=0, nullable=True)
    """Clip the prefix gradient to this L2 norm; null: no clipping."""
    seed: int = _f(0, "int", minimum=0)
    """Seed of the prefix initialisation and of the example order."""
    eval_every: int = _f(50, "int", minimum=1)
    """Evaluate on the validation rows every this many steps (and at the end)."""
    checkpoint_every: int = _f(50, "int", minimum=1)
    """Save a resumable checkpoint every this many steps (and at the end)."""
    eval_generation: EvalGenerationSpec = _section(EvalGenerationSpec)
    """Generation at evaluation time, for the generation metrics."""


@dataclass(frozen=True, kw_only=True)
class RegistrySpec:
    """Where the trained prefix is logged and registered in MLflow."""

    model_name: str | None = _f(
        None, "str", pattern=NAME_PATTERN, pattern_help=NAME_RULE, nullable=True,
        derived=f"'{REGISTERED_NAME_PREFIX}' + name",
    )
    """MLflow registered-model name; same rule as name."""
    metric: str = _f("eval_loss", "str", choices=METRICS)
    """Validation metric that picks the best checkpoint and is recorded with the registered version."""
    direction: str | None = _f(
        None, "str", choices=("minimize", "maximize"), nullable=True,
        derived="minimize for eval_loss and eval_perplexity, maximize for the others",
    )
    """Whether a lower or a higher metric is better."""
    experiment: str | None = _f(None, "str", max_length=256, nullable=True)
    """MLflow experiment to log the run in; null: the operator's default experiment."""
    register: bool = _f(True, "bool")
    """Register the best prefix as a new version of model_name (false: log the run only)."""


@dataclass(frozen=True, kw_only=True)
class JobSpec:
    """One task to train: a prefix for a frozen base model, on the task's data."""

    name: str = _f(kind="str", pattern=NAME_PATTERN, pattern_help=NAME_RULE)
    """Task name; names files and the default MLflow registered model."""
    base_model: BaseModelSpec = _section(BaseModelSpec, required=True)
    """The frozen base model."""
    data: DataSpec = _section(DataSpec, required=True)
    """The task's data."""
    prefix: PrefixSpec = _section(PrefixSpec)
    """The prefix being trained."""
    training: TrainingSpec = _section(TrainingSpec, required=True)
    """The optimisation."""
    priority: int = _f(0, "int", minimum=-1000, maximum=1000)
    """Queue priority, -1000..1000: higher runs first; equal priorities run in submission order."""
    registry: RegistrySpec = _section(RegistrySpec)
    """MLflow logging and registration."""
    tags: Tags = field(
        default_factory=Tags,
        metadata={"rule": _Rule(kind="tags", pattern=TAG_KEY_PATTERN, max_length=TAG_VALUE_MAX)},
    )
    """Free-form labels, copied to the MLflow run and model version."""

    def to_dict(self) -> dict[str, Any]:
        """The spec as plain JSON-serialisable data with every default filled in and paths absolute."""
        return _to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> JobSpec:
        """Rebuild a spec from `to_dict()` output. Trusts it: no validation, no file access."""
        return _build(cls, d)

    def flat_params(self) -> dict[str, str]:
        """Dotted keys to string values ('training.learning_rate' -> '0.005'), e.g. for MLflow params.
        Strings are kept as is; other values are JSON ('true', 'null', '60'); empty tags add nothing."""
        out: dict[str, str] = {}

        def walk(d: Mapping[str, Any], prefix: str) -> None:
            for k, v in d.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                else:
                    out[f"{prefix}{k}"] = v if isinstance(v, str) else json.dumps(v)

        walk(self.to_dict(), "")
        return out


# --- entry points -----------------------------------------------------------------------------------------


def load_spec(path: str | Path) -> JobSpec:
    """Read, parse and validate the YAML (or, for a .json suffix, JSON) job spec at `path`.

    Relative paths in it are resolved against the file's folder. Raises SpecError listing every problem.
    """
    path = Path(path)
    obj = _read_document(path, str(path))
    return parse_spec(obj, base_dir=path.resolve().parent, source=str(path))


def parse_spec(obj: Any, *, base_dir: Path, source: str = "<spec>") -> JobSpec:
    """Validate an already-parsed spec (e.g. a JSON request body) and return it as a JobSpec.

    `base_dir` anchors relative paths; `source` names the spec in errors. Checks that the data files
    exist and hold the named columns, and that the prefix fits the model. Raises SpecError.
    """
    problems: list[Problem] = []
    base_dir = Path(base_dir).resolve()
    c = _check_section(JobSpec, obj, "", base_dir, problems)
    if c is not None:
        raw = obj
        context = _check_base_model(c.get("base_model"), raw.get("base_model"), problems)
        _check_data(c.get("data"), raw.get("data"), problems)
        _check_context(c, context, problems)
        _check_training(c.get("training"), problems)
        _fill_registry(c, problems)
    if problems:
        raise SpecError(source, problems)
    return _build(JobSpec, c)


def spec_json_schema() -> dict[str, Any]:
    """JSON Schema (draft 2020-12) of a job spec file, generated from the same field table as parse_spec.

    It checks types, ranges, choices, unknown keys and the exactly-one-of groups; it cannot check files,
    columns, the model's context or the derived-default lengths, which parse_spec does.
    """
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "prefixd job spec",
        **_section_schema(JobSpec),
    }


# --- validation -------------------------------------------------------------------------------------------

_INVALID = object()


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _describe(value: Any) -> str:
    if value is None:
        return "null (an empty value)"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value!r}"
    if isinstance(value, str):
        text = value if len(value) <= 60 else value[:57] + "..."
        return f"string {text!r}"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    return type(value).__name__


def _expected(rule: _Rule) -> str:
    return {
        "bool": "true or false",
        "int": "an integer",
        "float": "a number",
        "str": "a string",
        "path": "a path (a string)",
        "section": "a mapping",
        "tags": "a mapping of strings to strings",
    }[rule.kind]


def _range_text(rule: _Rule) -> str:
    parts = []
    if rule.minimum is not None:
        parts.append(f">= {rule.minimum:g}")
    if rule.exclusive_minimum is not None:
        parts.append(f"> {rule.exclusive_minimum:g}")
    if rule.maximum is not None:
        parts.append(f"<= {rule.maximum:g}")
    if rule.exclusive_maximum is not None:
        parts.append(f"< {rule.exclusive_maximum:g}")
    return " and ".join(parts)


def _in_range(rule: _Rule, x: float) -> bool:
    return not (
        (rule.minimum is not None and x < rule.minimum)
        or (rule.exclusive_minimum is not None and x <= rule.exclusive_minimum)
        or (rule.maximum is not None and x > rule.maximum)
        or (rule.exclusive_maximum is not None and x >= rule.exclusive_maximum)
    )


def _first_sentence(text: str) -> str:
    return text.split(". ")[0].rstrip(".")


def _check_section(cls: type, raw: Any, path: str, base_dir: Path, problems: list[Problem]) -> dict | None:
    """Type-check one section against its field table. Returns its fields' values (defaults filled in,
    nested sections as dicts, derived defaults as None), leaving out fields that had a problem."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if not isinstance(raw, Mapping):
        where = "a job spec" if not path else "this section"
        problems.append(Problem(path, f"{where} must be a mapping with keys {', '.join(fields)}; "
                                      f"got {_describe(raw)}"))
        return None
    for key in raw:
        if key not in fields:
            problems.append(Problem(_join(path, str(key)), _unknown_key(key, list(fields))))
    out: dict[str, Any] = {}
    for name, f in fields.items():
        rule: _Rule = f.metadata["rule"]
        p = _join(path, name)
        if name not in raw:
            if f.default is MISSING and f.default_factory is MISSING:
                doc = _field_docs(cls).get(name, "")
                problems.append(Problem(p, "missing (required)" + (f": {_first_sentence(doc)}" if doc else "")))
            elif rule.kind == "section" and not rule.nullable:
                out[name] = _check_section(rule.section, {}, p, base_dir, problems)
            elif rule.kind == "tags":
                out[name] = {}
            else:
                out[name] = f.default
            continue
        value = _check_value(rule, raw[name], p, base_dir, problems)
        if value is not _INVALID:
            out[name] = value
    for group in getattr(cls, "ONE_OF", ()):
        given = [k for k in group if raw.get(k) is not None]
        if len(given) != 1:
            options = " or ".join(f"'{k}'" for k in group) if len(group) == 2 else ", ".join(group)
            got = "neither" if not given and len(group) == 2 else ("none" if not given else " and ".join(given))
            problems.append(Problem(path, f"give exactly one of {options}; got {got}"))
    return out


def _unknown_key(key: Any, accepted: list[str]) -> str:
    if key in _KEY_HINTS:
        return f"unknown key: {_KEY_HINTS[key]}"
    close = difflib.get_close_matches(str(key), accepted, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return f"unknown key{hint}; accepted keys here: {', '.join(accepted)}"


def _check_value(rule: _Rule, value: Any, path: str, base_dir: Path, problems: list[Problem]) -> Any:
    def bad(message: str) -> object:
        problems.append(Problem(path, message))
        return _INVALID

    if value is None:
        return None if rule.nullable else bad(f"expected {_expected(rule)}, got {_describe(value)}")
    kind = rule.kind
    if kind == "section":
        out = _check_section(rule.section, value, path, base_dir, problems)
        return _INVALID if out is None else out
    if kind == "tags":
        return _check_tags(rule, value, path, problems)
    if kind == "bool":
        return value if isinstance(value, bool) else bad(f"expected true or false, got {_describe(value)}")
    if kind in ("int", "float"):
        wanted = int if kind == "int" else (int, float)
        if isinstance(value, bool) or not isinstance(value, wanted):
            return bad(f"expected {_expected(rule)}, got {_describe(value)}")
        if not math.isfinite(value):
            return bad(f"expected a finite number, got {value!r}")
        if not _in_range(rule, value):
            return bad(f"must be {_range_text(rule)}, got {value!r}")
        return float(value) if kind == "float" else value
    # str and path
    if not isinstance(value, str):
        return bad(f"expected {_expected(rule)}, got {_describe(value)}")
    if rule.choices:
        if value not in rule.choices:
            return bad(f"{value!r} is not one of {', '.join(rule.choices)}")
        return value
    if not value.strip():
        return bad("must not be empty")
    if len(value) > rule.max_length:
        return bad(f"is {len(value)} characters long; at most {rule.max_length} are accepted")
    if rule.pattern and not re.fullmatch(rule.pattern, value):
        return bad(f"{value!r} does not match {rule.pattern} ({rule.pattern_help})")
    if kind == "path":
        return (base_dir / value).resolve()
    return value


def _check_tags(rule: _Rule, value: Any, path: str, problems: list[Problem]) -> Any:
    if not isinstance(value, Mapping):
        problems.append(Problem(path, f"expected {_expected(rule)}, got {_describe(value)}"))
        return _INVALID
    if len(value) > rule.max_items:
        problems.append(Problem(path, f"has {len(value)} tags; at most {rule.max_items} are accepted"))
        return _INVALID
    ok = True
    for k, v in value.items():
        p = _join(path, str(k))
        if not isinstance(k, str) or not re.fullmatch(rule.pattern, k):
            problems.append(Problem(p, f"tag key {k!r} does not match {rule.pattern}"))
            ok = False
        elif not isinstance(v, str):
            problems.append(Problem(p, f"tag values are strings; got {_describe(v)} (quote it)"))
            ok = False
        elif len(v) > rule.max_length:
            problems.append(Problem(p, f"tag value is {len(v)} characters long; at most {rule.max_length}"))
            ok = False
    return dict(value) if ok else _INVALID


def _check_base_model(bm: dict | None, raw: Any, problems: list[Problem]) -> tuple[int, str] | None:
    """Check a local model folder; return the model's context (tokens, where it came from) when known."""
    if not bm or sum(bm.get(k) is not None for k in ("builtin", "path", "hub")) != 1:
        return None
    if bm.get("builtin") is not None:
        return BUILTIN_MODELS[bm["builtin"]].context_length, f"built-in model {bm['builtin']!r}"
    folder: Path | None = bm.get("path")
    if folder is None:
        return None  # hub: checked by the worker that downloads it
    given = raw["path"]
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "no such folder"
        problems.append(Problem("base_model.path", f"{what} {given!r} (looked for {folder})"))
        return None
    config_path = folder / "config.json"
    if not config_path.is_file():
        problems.append(Problem("base_model.path", f"folder {given!r} has no config.json "
                                                   f"(expected a model saved with save_pretrained)"))
        return None
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        problems.append(Problem("base_model.path", f"{config_path}: not a readable JSON file ({e})"))
        return None
    if not isinstance(config, dict):
        problems.append(Problem("base_model.path", f"{config_path}: not a JSON object"))
        return None
    for key in CONTEXT_KEYS:
        n = config.get(key)
        if isinstance(n, int) and not isinstance(n, bool) and n > 0:
            return n, f"{key} in {given}/config.json"
    return None  # e.g. T5: relative positions, no fixed limit


def _check_data(d: dict | None, raw: Any, problems: list[Problem]) -> None:
    if d is None:
        return
    columns: dict[str, list[str]] = {}
    for key in ("train", "validation"):
        p: Path | None = d.get(key)
        if p is None:
            continue
        if not p.exists():
            problems.append(Problem(f"data.{key}", f"no such file {raw[key]!r} (looked for {p})"))
        elif "format" in d:
            try:
                columns[key] = read_column_names(p, d["format"])
            except DataFileError as e:
                problems.append(Problem(f"data.{key}", str(e)))

    named: list[tuple[str, str]] = []  # (field path, column)
    if d.get("input_column") is not None:
        named.append(("data.input_column", d["input_column"]))
    if d.get("template") is not None:
        names = _template_fields(d["template"], problems)
        named += [("data.template", n) for n in names]
        if d.get("target_column") in names:
            problems.append(Problem("data.template", f"names the target column {d['target_column']!r}: "
                                                     "the prompt would contain the answer"))
    if d.get("target_column") is not None:
        if d["target_column"] == d.get("input_column"):
            problems.append(Problem("data.target_column", "must differ from data.input_column"))
        named.append(("data.target_column", d["target_column"]))
    for path, column in named:
        for key, cols in columns.items():
            if column not in cols:
                problems.append(Problem(path, f"column {column!r} is not in data.{key} {raw[key]!r} "
                                              f"(its columns: {', '.join(cols)})"))


def _template_fields(template: str, problems: list[Problem]) -> list[str]:
    """The column names a template reads; only plain {column} placeholders are accepted (no attribute or
    index access, no conversions or format specs: the template is data, never code)."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        problems.append(Problem("data.template", f"{e} (write a literal brace as '{{{{' or '}}}}')"))
        return []
    names: list[str] = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if name == "" or name.isdigit() or "." in name or "[" in name or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            problems.append(Problem("data.template", f"placeholder {shown} must be a plain column name, "
                                                     "like {question}"))
        elif name not in names:
            names.append(name)
    if not names and not any(p.path == "data.template" for p in problems):
        problems.append(Problem("data.template", "has no {column} placeholder; for a prompt that is a column "
                                                 "as is, use data.input_column"))
    return names


def _check_context(c: dict, context: tuple[int, str] | None, problems: list[Problem]) -> None:
    if context is None:
        return
    limit, where = context
    n = (c.get("prefix") or {}).get("num_virtual_tokens")
    max_length = (c.get("data") or {}).get("max_length")
    if n is None:
        return
    if n >= limit:
        problems.append(Problem("prefix.num_virtual_tokens", f"{n} virtual tokens do not fit the model's "
                                f"context of {limit} tokens ({where}); use fewer than {limit}"))
    elif max_length is not None and n + max_length > limit:
        problems.append(Problem("data.max_length", f"{max_length} + prefix.num_virtual_tokens {n} = "
                                f"{n + max_length} tokens exceeds the model's context of {limit} tokens "
                                f"({where}); use data.max_length <= {limit - n}"))


def _check_training(t: dict | None, problems: list[Problem]) -> None:
    if t and t.get("steps") is not None and t.get("warmup_steps") is not None and t["warmup_steps"] > t["steps"]:
        problems.append(Problem("training.warmup_steps", f"{t['warmup_steps']} warmup steps exceed "
                                                         f"training.steps {t['steps']}"))


def _fill_registry(c: dict, problems: list[Problem]) -> None:
    """Choose the registry defaults that depend on other fields."""
    reg = c.get("registry")
    if reg is None:
        return
    if "model_name" in reg and reg["model_name"] is None and "name" in c:
        derived = REGISTERED_NAME_PREFIX + c["name"]
        if re.fullmatch(NAME_PATTERN, derived):
            reg["model_name"] = derived
        else:
            problems.append(Problem("registry.model_name", f"the default {derived!r} is longer than 63 "
                                    "characters; set registry.model_name or shorten name"))
    if "direction" in reg and reg["direction"] is None and "metric" in reg:
        reg["direction"] = "minimize" if reg["metric"] in LOWER_IS_BETTER else "maximize"


# --- building and dumping ---------------------------------------------------------------------------------


def _build(cls: type, d: Mapping[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(d) - set(fields)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown keys {sorted(unknown)} (a spec stored by another version?)")
    kwargs = {}
    for name, v in d.items():
        rule: _Rule = fields[name].metadata["rule"]
        if v is None:
            kwargs[name] = None
        elif rule.kind == "section":
            kwargs[name] = _build(rule.section, v)
        elif rule.kind == "path":
            kwargs[name] = Path(v)
        elif rule.kind == "tags":
            kwargs[name] = Tags(v)
        elif rule.kind == "float":
            kwargs[name] = float(v)
        else:
            kwargs[name] = v
    return cls(**kwargs)


def _to_dict(obj: Any) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = _to_dict(v)
        elif isinstance(v, Path):
            v = str(v)
        elif isinstance(v, Tags):
            v = dict(v)
        out[f.name] = v
    return out


# --- JSON Schema ------------------------------------------------------------------------------------------


@functools.cache
def _field_docs(cls: type) -> dict[str, str]:
    """Field name -> its attribute docstring (the string literal under the field), whitespace collapsed."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _section_schema(cls: type) -> dict[str, Any]:
    docs = _field_docs(cls)
    properties: dict[str, Any] = {}
    required = []
    for f in dataclasses.fields(cls):
        rule: _Rule = f.metadata["rule"]
        s = _value_schema(rule)
        description = docs.get(f.name, "")
        if rule.derived:
            description += f" Default: {rule.derived}."
        if description:
            s = {"description": description.strip(), **s}
        if f.default is MISSING and f.default_factory is MISSING:
            required.append(f.name)
        elif not rule.derived and f.default is not MISSING:
            s["default"] = f.default
        elif rule.kind == "tags":
            s["default"] = {}
        properties[f.name] = s
    out: dict[str, Any] = {"type": "object"}
    if cls.__doc__:
        out["description"] = " ".join(cls.__doc__.split())
    out["properties"] = properties
    out["additionalProperties"] = False
    if required:
        out["required"] = required
    groups = getattr(cls, "ONE_OF", ())
    if groups:
        # exactly one key of each group present and not null
        out["allOf"] = [
            {"oneOf": [{"required": [k], "properties": {k: {"not": {"type": "null"}}}} for k in group]}
            for group in groups
        ]
    return out


def _value_schema(rule: _Rule) -> dict[str, Any]:
    kind = rule.kind
    if kind == "section":
        s = _section_schema(rule.section)
        return {"anyOf": [s, {"type": "null"}]} if rule.nullable else s
    if kind == "tags":
        return {
            "type": "object",
            "maxProperties": rule.max_items,
            "propertyNames": {"pattern": rule.pattern},
            "additionalProperties": {"type": "string", "maxLength": rule.max_length},
        }
    s: dict[str, Any] = {"type": {"bool": "boolean", "int": "integer", "float": "number"}.get(kind, "string")}
    if kind in ("str", "path"):
        if rule.choices:
            s["enum"] = list(rule.choices) + ([None] if rule.nullable else [])
        else:
            s["minLength"] = 1
            s["maxLength"] = rule.max_length
            if rule.pattern:
                s["pattern"] = rule.pattern
    for key, bound in (("minimum", rule.minimum), ("maximum", rule.maximum),
                       ("exclusiveMinimum", rule.exclusive_minimum), ("exclusiveMaximum", rule.exclusive_maximum)):
        if bound is not None:
            s[key] = bound
    if rule.nullable:
        s["type"] = [s["type"], "null"]
    return s


# --- reading files ----------------------------------------------------------------------------------------

_YAML = "tag:yaml.org,2002:"
_PLAIN_TAGS = {_YAML + t for t in ("str", "int", "float", "bool", "null", "map", "seq", "merge")}


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-style numbers ('1e-3' is a float, not a string) and no timestamps
    ('2024-01-01' stays a string)."""


_SpecLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag not in (_YAML + "float", _YAML + "timestamp")]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_SpecLoader.add_implicit_resolver(
    _YAML + "float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _read_document(path: Path, source: str) -> Any:
    """The file's single YAML/JSON document as plain data; SpecError for anything else."""

    def fail(message: str) -> None:
        raise SpecError(source, [Problem("", message)])

    try:
        st = path.stat()
    except FileNotFoundError:
        fail(f"no such file (looked for {path.resolve()})")
    except OSError as e:
        fail(f"cannot read the file: {e.strerror}")
    if stat.S_ISDIR(st.st_mode):
        fail("is a folder, not a job spec file")
    if not stat.S_ISREG(st.st_mode):
        fail("is not a regular file")
    too_big = f"the file is over {MAX_SPEC_BYTES} bytes (1 MiB), the most a job spec may be"
    if st.st_size > MAX_SPEC_BYTES:
        fail(too_big)
    with open(path, "rb") as fh:
        data = fh.read(MAX_SPEC_BYTES + 1)
    if len(data) > MAX_SPEC_BYTES:
        fail(too_big)
    if b"\0" in data:
        fail("binary data (it holds NUL bytes), not a YAML or JSON text file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        fail(f"not UTF-8 text (undecodable byte at offset {e.start})")
    if not text.strip():
        fail("the file is empty")
    if path.suffix.lower() == ".json":
        return _parse_json(text, source)
    return _parse_yaml(text, source)


def _parse_yaml(text: str, source: str) -> Any:
    def fail(message: str) -> None:
        raise SpecError(source, [Problem("", message)])

    loader = None
    try:
        loader = _SpecLoader(text)  # its reader already refuses control characters
        node = loader.get_single_node()
        if node is None:
            fail("the file is empty (only comments or blank lines)")
        problems = _check_yaml_nodes(node)
        if problems:
            raise SpecError(source, problems)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as e:
        where = e.problem_mark or e.context_mark
        at = f" (line {where.line + 1}, column {where.column + 1})" if where else ""
        what = "; ".join(x for x in (e.context, e.problem) if x)
        fail(f"not valid YAML: {what}{at}")
    except yaml.YAMLError as e:
        fail(f"not valid YAML: {' '.join(str(e).split())}")
    except RecursionError:
        fail("not accepted: the YAML is nested too deeply")
    finally:
        if loader is not None:
            loader.dispose()


def _check_yaml_nodes(root: yaml.Node) -> list[Problem]:
    """Before anything is constructed: refuse non-plain tags and duplicate keys, and cap the number of
    values with aliases expanded (an alias repeats its anchor's whole subtree, possibly recursively)."""
    problems = []
    stack: list[tuple[yaml.Node, str]] = [(root, "")]
    count = 0
    while stack:
        node, path = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            return [Problem("", f"more than {MAX_YAML_NODES} values once YAML aliases are expanded; "
                                "a job spec needs far fewer")]
        line = node.start_mark.line + 1
        if node.tag not in _PLAIN_TAGS:
            tag = node.tag.replace(_YAML, "!!")
            problems.append(Problem(path, f"YAML tag {tag!r} (line {line}) is not accepted: a job spec holds "
                                          "only plain mappings, lists, strings, numbers and booleans"))
            continue
        children: list[tuple[yaml.Node, str]] = []
        if isinstance(node, yaml.MappingNode):
            seen: dict[str, int] = {}
            for key, value in node.value:
                if key.tag == _YAML + "merge":
                    children.append((value, path))
                    continue
                name = key.value if isinstance(key, yaml.ScalarNode) else "<complex key>"
                if isinstance(key, yaml.ScalarNode):
                    if name in seen:
                        problems.append(Problem(_join(path, name), f"duplicate key (lines {seen[name]} and "
                                                                   f"{key.start_mark.line + 1})"))
                    seen[name] = key.start_mark.line + 1
                children += [(key, path), (value, _join(path, name))]
        elif isinstance(node, yaml.SequenceNode):
            children = [(item, f"{path}[{i}]") for i, item in enumerate(node.value)]
        stack.extend(reversed(children))
    return problems


class _JsonObject(dict):
    duplicates: list[str]


def _json_object(pairs: list[tuple[str, Any]]) -> _JsonObject:
    obj = _JsonObject()
    obj.duplicates = []
    for k, v in pairs:
        if k in obj:
            obj.duplicates.append(k)
        obj[k] = v
    return obj


def _parse_json(text: str, source: str) -> Any:
    try:
        obj = json.loads(text, object_pairs_hook=_json_object)
    except json.JSONDecodeError as e:
        raise SpecError(source, [Problem("", f"not valid JSON: {e.msg} (line {e.lineno}, column {e.colno})")])
    except RecursionError:
        raise SpecError(source, [Problem("", "not accepted: the JSON is nested too deeply")]) from None
    problems = []
    stack: list[tuple[Any, str]] = [(obj, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, _JsonObject):
            problems += [Problem(_join(path, k), "duplicate key") for k in value.duplicates]
            stack += [(v, _join(path, k)) for k, v in value.items()]
        elif isinstance(value, list):
            stack += [(v, f"{path}[{i}]") for i, v in enumerate(value)]
    if problems:
        raise SpecError(source, problems)
    return obj


if __name__ == "__main__":
    json.dump(spec_json_schema(), sys.stdout, indent=2)
    sys.stdout.write("\n")
