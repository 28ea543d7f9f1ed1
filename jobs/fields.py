"""The job spec's field table: frozen dataclasses whose fields carry their rules (type, range, choices).

    JobSpec.from_dict(stored)            # rebuild a validated spec (trusted: no checks, no file access)
    numeric_fields()                     # {"training.steps": its _Rule, ...}: every int and float field

`jobs.validate` checks a document against these rules and `jobs.spec_schema` turns them into JSON Schema;
the reference with every field is `jobs/examples/reference.yaml`. Every int and float field has a `maximum`
(the default bound; `jobs.bounds.SpecBounds` lets an operator lower it, or raise it up to `ceiling`).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import json
import textwrap
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any

from jobs.builtin_models import BUILTIN_MODELS
from jobs.datafiles import FORMATS
from workers.storage import is_remote

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
NAME_RULE = "lowercase letters, digits, '-' and '_', starting with a letter or digit, at most 63 characters"
TAG_KEY_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
TAG_VALUE_MAX = 256
HUB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$"
HUB_REVISION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,127}$"
METRICS = ("eval_loss", "eval_perplexity", "exact_match", "bleu", "rouge_l")
LOWER_IS_BETTER = ("eval_loss", "eval_perplexity")
GENERATION_METRICS = ("exact_match", "bleu", "rouge_l")  # measured only with training.eval_generation.enabled
REGISTERED_NAME_PREFIX = "prefixd-"
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_target_positions")
RESERVED_TAG_PREFIX = "prefixd."  # tags of this prefix are prefixd's own (registry bookkeeping)
INT32_MAX = 2**31 - 1  # the job store's integer columns (PostgreSQL INTEGER)

# --- the field table --------------------------------------------------------------------------------------
# Each dataclass field carries a _Rule; the validator (jobs.validate) and the JSON Schema (jobs.spec_schema)
# both read them, and the per-field docstrings become the schema's descriptions.


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
    ceiling: float | None = None  # int/float: the most an operator may raise `maximum` to (None: maximum is fixed)
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
    stored absolute. Or a storage URI (s3://bucket/key, read through the storage layer on every worker)."""
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
    max_length: int = _f(256, "int", minimum=8, maximum=32_768, ceiling=1 << 20)
    """Most tokens in one example: prompt + target + end-of-sequence token."""
    truncation: str = _f("left", "str", choices=("left", "skip", "error"))
    """An example over max_length: 'left' drops prompt tokens from the left so the target fits, 'skip'
    drops the row (and counts it), 'error' fails the job."""
    validation_fraction: float = _f(0.1, "float", exclusive_minimum=0, exclusive_maximum=0.5)
    """Share of train rows held out for validation when no validation file is given (0 < x < 0.5)."""
    seed: int = _f(0, "int", minimum=0, maximum=INT32_MAX)
    """Seed of the held-out split."""
    max_validation_rows: int = _f(10_000, "int", minimum=1, maximum=100_000, ceiling=10_000_000)
    """Most validation rows (a validation file's rows, or the held-out share of train); a task with more is
    refused when its data is loaded."""


@dataclass(frozen=True, kw_only=True)
class PrefixSpec:
    """The trained prefix: virtual key/value tokens prepended at every layer of the frozen model."""

    num_virtual_tokens: int = _f(10, "int", minimum=1, maximum=512, ceiling=8192)
    """Prefix length in tokens, per layer; must be fewer than the model's context."""
    projection: bool = _f(False, "bool")
    """Reparameterise the prefix through a two-layer MLP while training (folded away afterwards)."""
    projection_hidden_size: int = _f(512, "int", minimum=1, maximum=2048, ceiling=65_536)
    """Hidden width of the projection MLP, in units; ignored unless projection is true."""
    init: str = _f("random", "str", choices=("random", "zero"))
    """Initial prefix values: 'random' (small normal noise) or 'zero'."""


@dataclass(frozen=True, kw_only=True)
class EvalGenerationSpec:
    """Generation on validation rows at each evaluation, for exact_match / bleu / rouge_l."""

    enabled: bool = _f(False, "bool")
    """Generate at each evaluation (needed for the exact_match, bleu and rouge_l metrics)."""
    samples: int = _f(32, "int", minimum=1, maximum=512, ceiling=100_000)
    """Validation rows generated for, per evaluation."""
    max_new_tokens: int = _f(32, "int", minimum=1, maximum=1024, ceiling=32_768)
    """Most tokens generated per row."""


@dataclass(frozen=True, kw_only=True)
class EarlyStoppingSpec:
    """Stop a task once registry.metric has not improved for `patience` evaluations in a row."""

    patience: int = _f(kind="int", minimum=1, maximum=1000, ceiling=100_000)
    """Evaluations (every eval_every steps) without an improvement after which the task stops."""
    min_delta: float = _f(0.0, "float", minimum=0, maximum=1000, ceiling=1e12)
    """Least change of the metric, in its direction, that counts as an improvement."""


@dataclass(frozen=True, kw_only=True)
class TrainingSpec:
    """How long and how the prefix is optimised: exactly one of steps and epochs."""

    ONE_OF = (("steps", "epochs"),)

    steps: int | None = _f(None, "int", minimum=1, maximum=100_000, ceiling=INT32_MAX, nullable=True)
    """Length of training in optimizer steps."""
    epochs: float | None = _f(None, "float", exclusive_minimum=0, maximum=100, ceiling=100_000, nullable=True)
    """Length of training in passes over the train rows (fractions allowed)."""
    examples_per_step: int = _f(8, "int", minimum=1, maximum=256, ceiling=1 << 20)
    """Examples per optimizer step (the task's batch size)."""
    learning_rate: float = _f(5e-3, "float", exclusive_minimum=0, maximum=1)
    """Peak learning rate of AdamW (0 < lr <= 1)."""
    schedule: str = _f("constant", "str", choices=("constant", "linear", "cosine"))
    """Learning-rate schedule after warmup: constant, linear decay to 0, or cosine decay to 0."""
    warmup_steps: int = _f(0, "int", minimum=0, maximum=100_000, ceiling=INT32_MAX)
    """Steps of linear warmup from 0 to learning_rate."""
    weight_decay: float = _f(0.0, "float", minimum=0, maximum=1, ceiling=1000)
    """AdamW decoupled weight decay."""
    max_grad_norm: float | None = _f(1.0, "float", exclusive_minimum=0, maximum=10_000, ceiling=1e12, nullable=True)
    """Clip the prefix gradient to this L2 norm; null: no clipping."""
    seed: int = _f(0, "int", minimum=0, maximum=INT32_MAX)
    """Seed of the prefix initialisation and of the example order."""
    eval_every: int = _f(50, "int", minimum=1, maximum=100_000, ceiling=INT32_MAX)
    """Evaluate on the validation rows every this many steps (and at the end)."""
    eval_max_rows: int = _f(256, "int", minimum=1, maximum=100_000, ceiling=10_000_000)
    """Validation rows scored at each periodic evaluation: a fixed seeded sample of this many (the same rows
    every time, so the curve is comparable); the evaluation at the end scores every validation row."""
    checkpoint_every: int = _f(50, "int", minimum=1, maximum=100_000, ceiling=INT32_MAX)
    """Save a resumable checkpoint every this many steps (and at the end)."""
    eval_generation: EvalGenerationSpec = _section(EvalGenerationSpec)
    """Generation at evaluation time, for the generation metrics."""
    early_stopping: EarlyStoppingSpec | None = _section(EarlyStoppingSpec, nullable=True)
    """Stop when registry.metric stops improving: {patience, min_delta}; null: train the whole budget. Either
    way the registered prefix is the best evaluation's."""


@dataclass(frozen=True, kw_only=True)
class RegistrySpec:
    """Where the trained prefix is logged and registered in MLflow."""

    model_name: str | None = _f(
        None,
        "str",
        pattern=NAME_PATTERN,
        pattern_help=NAME_RULE,
        nullable=True,
        derived=f"'{REGISTERED_NAME_PREFIX}' + name",
    )
    """MLflow registered-model name; same rule as name. A model belongs to the tenant that created it: only
    its jobs add versions to it."""
    metric: str = _f("eval_loss", "str", choices=METRICS)
    """Validation metric that picks the best checkpoint (and drives training.early_stopping) and is recorded
    with the registered version."""
    direction: str | None = _f(
        None,
        "str",
        choices=("minimize", "maximize"),
        nullable=True,
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
    priority: int = _f(0, "int", minimum=-1000, maximum=1000, ceiling=1_000_000)
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


def metric_direction(metric: str) -> str:
    """registry.direction's default for a metric: 'minimize' for eval_loss and eval_perplexity, else 'maximize'."""
    return "minimize" if metric in LOWER_IS_BETTER else "maximize"


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
            kwargs[name] = v if is_remote(v) else Path(v)  # a data file's storage URI stays as written
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
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def spec_default(cls: type, name: str) -> Any:
    """The field table's default of `cls.name`, for code outside the spec that takes the same setting.

    spec_default(DataSpec, "max_length") == 256
    """
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    assert f.default is not MISSING, f"{cls.__name__}.{name} has no plain default"
    return f.default


def numeric_fields(cls: type | None = None, prefix: str = "") -> dict[str, _Rule]:
    """Every int and float field of the spec by its dotted path: {'training.steps': its _Rule, ...}."""
    out: dict[str, _Rule] = {}
    for f in dataclasses.fields(cls or JobSpec):
        rule: _Rule = f.metadata["rule"]
        if rule.kind == "section":
            out.update(numeric_fields(rule.section, f"{prefix}{f.name}."))
        elif rule.kind in ("int", "float"):
            out[prefix + f.name] = rule
    return out
