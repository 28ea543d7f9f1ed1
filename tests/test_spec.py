import copy
import json
import pickle
import runpy
from pathlib import Path

import jsonschema
import pytest
import yaml

from jobs.fields import EarlyStoppingSpec
from jobs.spec import (
    MAX_SPEC_BYTES,
    JobSpec,
    Problem,
    SpecError,
    load_spec,
    parse_spec,
    spec_json_schema,
)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "jobs" / "examples"
EXAMPLE_SPECS = sorted(EXAMPLES.glob("*.yaml"))
DELETE = object()


@pytest.fixture
def task(tmp_path):
    """A folder with a two-column data file, a small local model folder, and a valid minimal spec."""
    (tmp_path / "train.jsonl").write_text('{"input": "x", "target": "y"}\n')
    (tmp_path / "train.txt").write_text("x")
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 64}))
    (tmp_path / "t5").mkdir()
    (tmp_path / "t5" / "config.json").write_text(json.dumps({"model_type": "t5", "d_model": 8}))
    (tmp_path / "empty_model").mkdir()
    return tmp_path


def minimal():
    return {
        "name": "t",
        "base_model": {"builtin": "smollm2-135m"},
        "data": {"train": "train.jsonl", "input_column": "input", "target_column": "target"},
        "training": {"steps": 10},
    }


def patched(spec, **changes):
    """A copy of `spec` with dotted-path keys ('data__train' for data.train) set, or removed with DELETE."""
    spec = copy.deepcopy(spec)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        d = spec
        for p in parents:
            d = d.setdefault(p, {})
        if value is DELETE:
            d.pop(leaf, None)
        else:
            d[leaf] = value
    return spec


def write(folder: Path, spec, name="spec.yaml") -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def refuse(path: Path) -> SpecError:
    with pytest.raises(SpecError) as e:
        load_spec(path)
    return e.value


# --- examples -------------------------------------------------------------------------------------------


def test_there_are_examples():
    assert len(EXAMPLE_SPECS) >= 3
    total = sum(p.stat().st_size for p in EXAMPLES.iterdir() if p.is_file())
    assert total < 300_000


@pytest.mark.parametrize("path", EXAMPLE_SPECS, ids=lambda p: p.name)
def test_example_is_valid_and_says_how_to_run_it(path):
    spec = load_spec(path)
    assert path.read_text().splitlines()[0] == f"# Run: prefixd submit jobs/examples/{path.name}"
    assert spec.base_model.builtin == "smollm2-135m"
    assert spec.data.train.is_absolute() and spec.data.train.parent == EXAMPLES
    assert spec.training.steps * spec.training.examples_per_step <= 400  # about a minute on 2 CPU cores
    assert 1e-2 <= spec.training.learning_rate <= 3e-2
    d = spec.to_dict()
    assert JobSpec.from_dict(json.loads(json.dumps(d))) == spec
    jsonschema.validate(d, spec_json_schema())
    jsonschema.validate(yaml.safe_load(path.read_text()), spec_json_schema())


def test_example_data_is_what_make_data_writes(tmp_path):
    runpy.run_path(str(EXAMPLES / "make_data.py"))["main"](tmp_path)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert written == sorted(p.name for p in EXAMPLES.glob("*.jsonl"))
    for name in written:
        assert (tmp_path / name).read_bytes() == (EXAMPLES / name).read_bytes(), name


def test_schema_on_disk_is_current():
    assert json.loads((ROOT / "jobs" / "schema.json").read_text()) == spec_json_schema()


# --- defaults, round trip, derived values -----------------------------------------------------------------


def test_minimal_spec_is_fully_defaulted(task):
    spec = load_spec(write(task, minimal()))
    assert spec.to_dict() == {
        "name": "t",
        "base_model": {"builtin": "smollm2-135m", "path": None, "hub": None, "dtype": "float32"},
        "data": {
            "train": str(task / "train.jsonl"),
            "validation": None,
            "format": "auto",
            "input_column": "input",
            "template": None,
            "target_column": "target",
            "max_length": 256,
            "truncation": "left",
            "validation_fraction": 0.1,
            "seed": 0,
            "max_validation_rows": 10000,
        },
        "prefix": {"num_virtual_tokens": 10, "projection": False, "projection_hidden_size": 512, "init": "random"},
        "training": {
            "steps": 10,
            "epochs": None,
            "examples_per_step": 8,
            "learning_rate": 0.005,
            "schedule": "constant",
            "warmup_steps": 0,
            "weight_decay": 0.0,
            "max_grad_norm": 1.0,
            "seed": 0,
            "eval_every": 50,
            "eval_max_rows": 256,
            "checkpoint_every": 50,
            "eval_generation": {"enabled": False, "samples": 32, "max_new_tokens": 32},
            "early_stopping": None,
        },
        "priority": 0,
        "registry": {
            "model_name": "prefixd-t",
            "metric": "eval_loss",
            "direction": "minimize",
            "experiment": None,
            "register": True,
        },
        "tags": {},
    }


def test_round_trip_trusts_the_stored_dict(task):
    spec = load_spec(
        write(
            task,
            patched(
                minimal(), tags={"team": "nlp"}, training__steps=DELETE, training__epochs=2, registry={"metric": "bleu"}
            ),
        )
    )
    stored = json.dumps(spec.to_dict())
    (task / "train.jsonl").unlink()  # from_dict must not look at files
    again = JobSpec.from_dict(json.loads(stored))
    assert again == spec and hash(again) == hash(spec)
    assert again.training.epochs == 2.0 and again.registry.direction == "maximize"
    assert again.tags["team"] == "nlp"
    assert pickle.loads(pickle.dumps(again)) == spec


def test_early_stopping_section_round_trips(task):
    spec = load_spec(write(task, patched(minimal(), training__early_stopping={"patience": 3})))
    assert spec.training.early_stopping == EarlyStoppingSpec(patience=3, min_delta=0.0)
    assert JobSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


def test_parse_of_to_dict_is_the_same_spec(task):
    spec = load_spec(write(task, minimal()))
    assert parse_spec(spec.to_dict(), base_dir=Path("/"), source="db") == spec


def test_relative_paths_resolve_against_the_spec_folder(task):
    (task / "specs").mkdir()
    spec = load_spec(
        write(task / "specs", patched(minimal(), data__train="../train.jsonl", base_model={"path": "../t5"}))
    )
    assert spec.data.train == task / "train.jsonl"
    assert spec.base_model.path == task / "t5"
    assert spec.base_model.base_key == f"path:{task / 't5'}:float32"


def test_base_keys(task):
    builtin = load_spec(write(task, patched(minimal(), base_model__dtype="bfloat16")))
    assert builtin.base_model.base_key == "builtin:smollm2-135m:bfloat16"
    hub = load_spec(write(task, patched(minimal(), base_model={"hub": {"id": "org/m", "revision": "abc123"}})))
    assert hub.base_model.base_key == "hub:org/m@abc123:float32"


def test_flat_params(task):
    spec = load_spec(write(task, patched(minimal(), tags={"team": "nlp"}, training__learning_rate=0.02)))
    params = spec.flat_params()
    assert params["training.learning_rate"] == "0.02"
    assert params["training.eval_generation.enabled"] == "false"
    assert params["training.epochs"] == "null"
    assert params["registry.model_name"] == "prefixd-t"
    assert params["tags.team"] == "nlp"
    assert all(isinstance(v, str) for v in params.values())


def test_yaml_numbers_and_dates_read_as_written(task):
    text = write(task, minimal()).read_text() + "tags: {date: 2024-01-01}\n"
    (task / "spec.yaml").write_text(text.replace("steps: 10", "steps: 10\n  learning_rate: 1e-2"))
    spec = load_spec(task / "spec.yaml")
    assert spec.training.learning_rate == 0.01  # PyYAML alone reads 1e-2 as a string
    assert spec.tags["date"] == "2024-01-01"


def test_json_spec(task):
    path = task / "spec.json"
    path.write_text(json.dumps(minimal()))
    assert load_spec(path).name == "t"


# --- malformed specs: each refused with the field path named ----------------------------------------------

LONG_NAME = "a" * 60

BAD_SPECS = [
    # (id, changes to the minimal spec, expected "path: message" fragment)
    ("name-dotdot", {"name": "../x"}, "name: '../x' does not match ^[a-z0-9][a-z0-9_-]{0,62}$"),
    ("name-upper", {"name": "Upper"}, "name: 'Upper' does not match"),
    ("name-space", {"name": "my task"}, "name: 'my task' does not match"),
    ("name-slash", {"name": "a/b"}, "name: 'a/b' does not match"),
    ("name-int", {"name": 5}, "name: expected a string, got integer 5"),
    ("name-missing", {"name": DELETE}, "name: missing (required)"),
    ("unknown-root-key", {"trainig": {}}, "trainig: unknown key (did you mean 'training'?)"),
    ("unknown-data-key", {"data__colum": "x"}, "data.colum: unknown key; accepted keys here: train, validation"),
    (
        "unknown-nested-key",
        {"training__eval_generation__sample": 3},
        "training.eval_generation.sample: unknown key (did you mean 'samples'?)",
    ),
    (
        "trust-remote-code",
        {"base_model__trust_remote_code": True},
        "base_model.trust_remote_code: unknown key: trust_remote_code is an operator setting",
    ),
    ("unknown-builtin", {"base_model__builtin": "gpt-9"}, "base_model.builtin: 'gpt-9' is not one of smollm2-135m"),
    (
        "two-base-models",
        {"base_model__path": "model"},
        "base_model: give exactly one of builtin, path, hub; got builtin and path",
    ),
    (
        "no-base-model",
        {"base_model": {"dtype": "float16"}},
        "base_model: give exactly one of builtin, path, hub; got none",
    ),
    ("hub-without-revision", {"base_model": {"hub": {"id": "org/m"}}}, "base_model.hub.revision: missing (required)"),
    ("hub-bad-id", {"base_model": {"hub": {"id": "nomodel", "revision": "main"}}}, "base_model.hub.id: 'nomodel'"),
    (
        "bad-dtype",
        {"base_model__dtype": "float64"},
        "base_model.dtype: 'float64' is not one of float32, bfloat16, float16",
    ),
    ("base-model-not-mapping", {"base_model": "smollm2-135m"}, "base_model: this section must be a mapping"),
    (
        "model-folder-without-config",
        {"base_model": {"path": "empty_model"}},
        "base_model.path: folder 'empty_model' has no config.json",
    ),
    ("model-folder-missing", {"base_model": {"path": "nowhere"}}, "base_model.path: no such folder 'nowhere'"),
    ("missing-data-file", {"data__train": "x.jsonl"}, "data.train: no such file 'x.jsonl'"),
    ("missing-validation-file", {"data__validation": "v.jsonl"}, "data.validation: no such file 'v.jsonl'"),
    ("unknown-data-suffix", {"data__train": "train.txt"}, "data.train: "),
    (
        "missing-target-column",
        {"data__target_column": "answer"},
        "data.target_column: column 'answer' is not in data.train 'train.jsonl' (its columns: input, target)",
    ),
    ("missing-input-column", {"data__input_column": "question"}, "data.input_column: column 'question' is not in"),
    (
        "template-missing-column",
        {"data__input_column": DELETE, "data__template": "Q: {question}\nA:"},
        "data.template: column 'question' is not in data.train",
    ),
    (
        "template-attribute",
        {"data__input_column": DELETE, "data__template": "{input.__class__}"},
        "data.template: placeholder {input.__class__} must be a plain column name",
    ),
    ("template-unbalanced", {"data__input_column": DELETE, "data__template": "Q: {input"}, "data.template: "),
    (
        "template-and-input-column",
        {"data__template": "{input}"},
        "data: give exactly one of 'input_column' or 'template'; got input_column and template",
    ),
    ("target-is-input", {"data__input_column": "target"}, "data.target_column: must differ from data.input_column"),
    ("data-not-mapping", {"data": "train.jsonl"}, "data: this section must be a mapping"),
    ("max-length-small", {"data__max_length": 4}, "data.max_length: must be >= 8 and <= 32768, got 4"),
    ("bad-truncation", {"data__truncation": "right"}, "data.truncation: 'right' is not one of left, skip, error"),
    (
        "validation-fraction-half",
        {"data__validation_fraction": 0.5},
        "data.validation_fraction: must be > 0 and < 0.5, got 0.5",
    ),
    (
        "steps-and-epochs",
        {"training__epochs": 2},
        "training: give exactly one of 'steps' or 'epochs'; got steps and epochs",
    ),
    (
        "neither-steps-nor-epochs",
        {"training": {"learning_rate": 0.01}},
        "training: give exactly one of 'steps' or 'epochs'; got neither",
    ),
    ("training-missing", {"training": DELETE}, "training: missing (required)"),
    ("steps-zero", {"training__steps": 0}, "training.steps: must be >= 1 and <= 100000, got 0"),
    (
        "eval-max-rows-big",
        {"training__eval_max_rows": 10**6},
        "training.eval_max_rows: must be >= 1 and <= 100000, got 1000000",
    ),
    (
        "max-validation-rows-big",
        {"data__max_validation_rows": 200_000},
        "data.max_validation_rows: must be >= 1 and <= 100000, got 200000",
    ),
    ("steps-bool", {"training__steps": True}, "training.steps: expected an integer, got boolean true"),
    ("steps-string", {"training__steps": "10"}, "training.steps: expected an integer, got string '10'"),
    ("steps-float", {"training__steps": 10.0}, "training.steps: expected an integer, got number 10.0"),
    (
        "epochs-negative",
        {"training__steps": DELETE, "training__epochs": -1},
        "training.epochs: must be > 0 and <= 100, got -1",
    ),
    ("learning-rate-zero", {"training__learning_rate": 0}, "training.learning_rate: must be > 0 and <= 1, got 0"),
    ("learning-rate-big", {"training__learning_rate": 5}, "training.learning_rate: must be > 0 and <= 1, got 5"),
    ("examples-per-step-negative", {"training__examples_per_step": -4}, "training.examples_per_step: must be >= 1"),
    (
        "weight-decay-infinite",
        {"training__weight_decay": float("inf")},
        "training.weight_decay: expected a finite number, got inf",
    ),
    ("max-grad-norm-zero", {"training__max_grad_norm": 0}, "training.max_grad_norm: must be > 0 and <= 10000, got 0"),
    (
        "warmup-longer-than-training",
        {"training__warmup_steps": 20},
        "training.warmup_steps: 20 warmup steps exceed training.steps 10",
    ),
    ("patience-missing", {"training__early_stopping": {}}, "training.early_stopping.patience: missing (required)"),
    (
        "patience-zero",
        {"training__early_stopping": {"patience": 0}},
        "training.early_stopping.patience: must be >= 1 and <= 1000, got 0",
    ),
    (
        "min-delta-negative",
        {"training__early_stopping": {"patience": 2, "min_delta": -0.1}},
        "training.early_stopping.min_delta: must be >= 0 and <= 1000, got -0.1",
    ),
    (
        "early-stopping-on-an-unmeasured-metric",
        {"training__early_stopping": {"patience": 2}, "registry": {"metric": "bleu"}},
        "training.early_stopping: watches registry.metric 'bleu', which is measured only with "
        "training.eval_generation.enabled true",
    ),
    ("bad-schedule", {"training__schedule": "exp"}, "training.schedule: 'exp' is not one of constant, linear, cosine"),
    (
        "max-new-tokens-big",
        {"training__eval_generation__max_new_tokens": 2000},
        "training.eval_generation.max_new_tokens: must be >= 1 and <= 1024, got 2000",
    ),
    (
        "eval-generation-enabled-string",
        {"training__eval_generation__enabled": "yes please"},
        "training.eval_generation.enabled: expected true or false, got string 'yes please'",
    ),
    ("prefix-too-long", {"prefix__num_virtual_tokens": 600}, "prefix.num_virtual_tokens: must be >= 1 and <= 512"),
    ("prefix-zero", {"prefix__num_virtual_tokens": 0}, "prefix.num_virtual_tokens: must be >= 1 and <= 512, got 0"),
    (
        "prefix-longer-than-context",
        {"base_model": {"path": "model"}, "prefix__num_virtual_tokens": 64},
        "prefix.num_virtual_tokens: 64 virtual tokens do not fit the model's context of 64 tokens "
        "(max_position_embeddings in model/config.json)",
    ),
    (
        "prefix-plus-max-length-longer-than-context",
        {"base_model": {"path": "model"}},
        "data.max_length: 256 + prefix.num_virtual_tokens 10 = 266 tokens exceeds the model's context of 64 tokens",
    ),
    ("bad-init", {"prefix__init": "normal"}, "prefix.init: 'normal' is not one of random, zero"),
    ("priority-out-of-range", {"priority": 5000}, "priority: must be >= -1000 and <= 1000, got 5000"),
    ("priority-bool", {"priority": False}, "priority: expected an integer, got boolean false"),
    ("bad-tag-key", {"tags": {"bad key!": "x"}}, "tags.bad key!: tag key 'bad key!' does not match"),
    ("tag-value-not-string", {"tags": {"version": 2}}, "tags.version: tag values are strings; got integer 2"),
    ("tags-list", {"tags": ["a"]}, "tags: expected a mapping of strings to strings, got a list"),
    ("bad-metric", {"registry": {"metric": "accuracy"}}, "registry.metric: 'accuracy' is not one of eval_loss"),
    ("bad-model-name", {"registry": {"model_name": "My Model"}}, "registry.model_name: 'My Model' does not match"),
    (
        "derived-model-name-too-long",
        {"name": LONG_NAME},
        f"registry.model_name: the default 'prefixd-{LONG_NAME}' is longer than 63 characters",
    ),
    ("bad-direction", {"registry": {"direction": "up"}}, "registry.direction: 'up' is not one of minimize, maximize"),
    ("empty-experiment", {"registry": {"experiment": ""}}, "registry.experiment: must not be empty"),
]


@pytest.mark.parametrize("changes, expected", [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_malformed_spec_is_refused_naming_the_field(task, changes, expected):
    error = refuse(write(task, patched(minimal(), **changes)))
    assert expected in str(error), str(error)
    assert str(error).startswith(f"{task / 'spec.yaml'}: ")


def test_t5_style_config_has_no_context_limit(task):
    spec = load_spec(write(task, patched(minimal(), base_model={"path": "t5"}, data__max_length=30_000)))
    assert spec.data.max_length == 30_000


def test_every_problem_is_reported_at_once(task):
    error = refuse(write(task, patched(minimal(), name="Bad Name", training__steps=0, data__train="x.jsonl")))
    assert [p.path for p in error.problems] == ["name", "training.steps", "data.train"]
    lines = str(error).splitlines()
    assert lines[0] == f"{task / 'spec.yaml'}: 3 problems in the job spec"
    assert lines[1].startswith("  name: 'Bad Name' does not match")
    assert lines[2] == "  training.steps: must be >= 1 and <= 100000, got 0"
    assert lines[3].startswith("  data.train: no such file 'x.jsonl' (looked for ")
    assert isinstance(error, ValueError)
    assert pickle.loads(pickle.dumps(error)).problems == error.problems


def test_parse_spec_refuses_a_non_mapping():
    with pytest.raises(SpecError) as e:
        parse_spec(["name", "t"], base_dir=Path("."), source="request")
    assert e.value.problems == [Problem("", e.value.problems[0].message)]
    assert str(e.value).startswith(
        "request: 1 problem in the job spec\n  a job spec must be a mapping with keys name, "
    )


# --- malformed files --------------------------------------------------------------------------------------

BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
    f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]\n"
    for i in range(8)
)

BAD_FILES = [
    ("empty", "spec.yaml", b"", "the file is empty"),
    ("only-comments", "spec.yaml", b"# nothing here\n\n", "the file is empty (only comments or blank lines)"),
    ("yaml-scalar", "spec.yaml", b"just a string\n", "a job spec must be a mapping with keys name, base_model"),
    ("yaml-list", "spec.yaml", b"- name: t\n- steps: 3\n", "a job spec must be a mapping with keys name, "),
    ("binary", "spec.yaml", bytes(range(256)) * 4, "binary data (it holds NUL bytes)"),
    ("not-utf8", "spec.yaml", b"name: caf\xe9\n", "not UTF-8 text (undecodable byte at offset 9)"),
    ("oversized", "spec.yaml", b"# " + b"x" * MAX_SPEC_BYTES + b"\n", "the file is over 1048576 bytes (1 MiB)"),
    (
        "python-tag",
        "spec.yaml",
        b"name: !!python/object/apply:os.system ['echo hi']\n",
        "name: YAML tag '!!python/object/apply:os.system' (line 1) is not accepted",
    ),
    ("custom-tag", "spec.yaml", b"name: !include other.yaml\n", "name: YAML tag '!include' (line 1) is not accepted"),
    ("alias-bomb", "spec.yaml", BOMB.encode(), "more than 10000 values once YAML aliases are expanded"),
    ("recursive-alias", "spec.yaml", b"a: &a [*a]\n", "more than 10000 values once YAML aliases are expanded"),
    (
        "duplicate-yaml-key",
        "spec.yaml",
        b"name: a\ntraining:\n  steps: 1\n  steps: 2\n",
        "training.steps: duplicate key (lines 3 and 4)",
    ),
    (
        "duplicate-json-key",
        "spec.json",
        b'{"name": "a", "training": {"steps": 1, "steps": 2}}',
        "training.steps: duplicate key",
    ),
    ("bad-yaml", "spec.yaml", b"name: [unclosed\n", "not valid YAML: "),
    ("two-documents", "spec.yaml", b"name: a\n---\nname: b\n", "not valid YAML: expected a single document"),
    ("bad-json", "spec.json", b'{"name": }', "not valid JSON: Expecting value (line 1, column 10)"),
    ("deep-nesting", "spec.yaml", b"[" * 50_000 + b"]" * 50_000, "not accepted: "),
    ("control-characters", "spec.yaml", b"name: a\x07b\n", "not valid YAML: unacceptable character"),
]


@pytest.mark.parametrize("name, content, expected", [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES])
def test_malformed_file_is_refused_cleanly(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    error = refuse(path)
    assert expected in str(error), str(error)
    assert str(error).startswith(f"{path}: ")


def test_missing_spec_file_and_folder(tmp_path):
    assert "no such file" in str(refuse(tmp_path / "nope.yaml"))
    assert "is a folder" in str(refuse(tmp_path))


# --- JSON Schema --------------------------------------------------------------------------------------------


def test_schema_is_valid_and_covers_every_field():
    schema = spec_json_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert list(schema["properties"]) == [
        "name",
        "base_model",
        "data",
        "prefix",
        "training",
        "priority",
        "registry",
        "tags",
    ]
    lr = schema["properties"]["training"]["properties"]["learning_rate"]
    assert lr == {
        "description": "Peak learning rate of AdamW (0 < lr <= 1).",
        "type": "number",
        "exclusiveMinimum": 0,
        "maximum": 1,
        "default": 0.005,
    }


@pytest.mark.parametrize(
    "changes",
    [
        {"training__epochs": 2},  # both steps and epochs
        {"training": {"learning_rate": 0.1}},  # neither
        {"training__steps": True},  # a boolean is not an integer
        {"data__colum": "x"},  # unknown key
        {"name": "../x"},
        {"base_model": {"hub": {"id": "org/m"}}},  # no revision
        {"base_model__path": "model"},  # two base models
        {"tags": {"bad key!": "x"}},
        {"priority": 1001},
    ],
)
def test_schema_rejects_bad_specs(changes):
    validator = jsonschema.Draft202012Validator(spec_json_schema())
    assert validator.is_valid(minimal())
    assert not validator.is_valid(patched(minimal(), **changes))
