"""The hardened spec reader (jobs/reader.py) and the bounds on every number (jobs/bounds.py): the same
refusals for files and request bodies, each naming what is wrong.

Run: python -m pytest -q tests/test_reader.py
"""

import json
from pathlib import Path

import pytest

from jobs.bounds import SpecBounds
from jobs.fields import numeric_fields
from jobs.reader import MAX_SPEC_BYTES, parse_document, read_spec_file
from jobs.spec import SpecError, load_spec, parse_spec


def refused(data: bytes, fmt: str = "yaml") -> str:
    with pytest.raises(SpecError) as e:
        parse_document(data, "body", fmt=fmt)
    return str(e.value)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("lr: 1e-3", 0.001),
        ("lr: 1.5E+2", 150.0),
        ("lr: .5", 0.5),
        ("lr: -2.", -2.0),
        ("n: 010", 10),
        ("n: 0o17", 15),
        ("n: 0x1f", 31),
        ("n: -7", -7),
        ("n: +3", 3),
        ("b: true", True),
        ("b: False", False),
        ("b: yes", "yes"),
        ("b: on", "on"),
        ("b: n", "n"),
        ("d: 2024-01-01", "2024-01-01"),
        ("x: 1_000", "1_000"),
        ("x: 1:20", "1:20"),
        ("x: ~", None),
        ("x:", None),
        ("x: .inf", float("inf")),
    ],
)
def test_yaml_1_2_core_scalars(text, expected):
    value = list(parse_document(text.encode(), "body").values())[0]
    assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize(
    "data, fmt, expected",
    [
        (b"n: !!int '12'\n", "yaml", "n: YAML tag '!!int' (line 1) is not accepted"),
        (b"n: !!str 12\n", "yaml", "n: YAML tag '!!str' (line 1) is not accepted"),
        (b"n: !!bool maybe\n", "yaml", "n: YAML tag '!!bool' (line 1) is not accepted"),
        (b"n: !!python/name:os.system\n", "yaml", "YAML tag '!!python/name:os.system'"),
        (b"n: " + b"9" * 65 + b"\n", "yaml", "an integer of 65 digits (at most 64)"),
        (b'{"n": ' + b"9" * 5000 + b"}", "json", "an integer of 5000 digits (at most 64)"),
        (b"[" * 100_000 + b"]" * 100_000, "yaml", "nested more than 32 levels deep (line 1)"),
        (b"[" * 100_000 + b"]" * 100_000, "json", "nested more than 32 levels deep"),
        (b'{"a":' * 40 + b"1" + b"}" * 40, "json", "nested more than 32 levels deep"),
        (b"".join(b"k%d: 1\n" % i for i in range(6000)), "yaml", "more than 10000 values"),
        (b"[" + b"0," * 20_000 + b"0]", "json", "more than 10000 values"),
        (b'{"a": 1, "a": 2}', "json", "a: duplicate key"),
        (b"a: 1\na: 2\n", "yaml", "a: duplicate key (lines 1 and 2)"),
        (b"x" * (MAX_SPEC_BYTES + 1), "yaml", "over 1048576 bytes"),
        (b"a: b\x00", "yaml", "NUL bytes"),
        (b"\xff\xfe", "json", "not UTF-8"),
        (b"  \n", "json", "empty"),
    ],
)
def test_refusals_name_what_is_wrong(data, fmt, expected):
    assert expected in refused(data, fmt)


def test_brackets_inside_json_strings_do_not_count_as_nesting():
    body = json.dumps({"template": "[" * 100 + "{q}" + "}" * 100, "tags": {"a": "{" * 50}})
    assert parse_document(body.encode(), "body", fmt="json")["tags"] == {"a": "{" * 50}


def test_file_and_body_read_alike(tmp_path):
    text = b"name: t\ntraining: {steps: 10, learning_rate: 1e-3}\n"
    (tmp_path / "s.yaml").write_bytes(text)
    assert (
        read_spec_file(tmp_path / "s.yaml")
        == parse_document(text, "body")
        == {"name": "t", "training": {"steps": 10, "learning_rate": 0.001}}
    )


# --- bounds ------------------------------------------------------------------------------------------------


def test_every_number_has_an_upper_bound():
    for path, rule in numeric_fields().items():
        assert rule.maximum is not None or rule.exclusive_maximum is not None, path


@pytest.fixture
def task(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"input": "x", "target": "y"}\n')
    return tmp_path


def spec(**training):
    return {
        "name": "t",
        "base_model": {"builtin": "smollm2-135m"},
        "data": {"train": "train.jsonl", "input_column": "input", "target_column": "target"},
        "training": {"steps": 10} | training,
    }


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("steps", 5_000_000_000, "training.steps: must be >= 1 and <= 100000, got 5000000000"),
        ("steps", 10**40, "training.steps: must be >= 1 and <= 100000, got 1000000000...000 (41 digits)"),
        ("examples_per_step", 10**6, "training.examples_per_step: must be >= 1 and <= 256, got 1000000"),
        ("eval_every", 2**31, "training.eval_every: must be >= 1 and <= 100000, got 2147483648"),
        ("seed", 2**40, "training.seed: must be >= 0 and <= 2.14748e+09, got 1099511627776"),
        ("eval_generation", {"samples": 10**9}, "training.eval_generation.samples: must be >= 1 and <= 512"),
    ],
)
def test_numbers_past_their_bound_are_refused(task, field, value, message):
    with pytest.raises(SpecError) as e:
        parse_spec(spec(**{field: value}), base_dir=task)
    assert message in str(e.value)


def test_operator_bounds(task, tmp_path):
    bounds_file = tmp_path / "bounds.yaml"
    bounds_file.write_text("training.steps: 20\nprefix.num_virtual_tokens: 1024\n")
    bounds = SpecBounds.from_file(bounds_file)
    with pytest.raises(SpecError, match=r"training.steps: must be >= 1 and <= 20, got 30"):
        parse_spec(spec(steps=30), base_dir=task, bounds=bounds)
    ok = dict(spec(), prefix={"num_virtual_tokens": 1000})
    assert parse_spec(ok, base_dir=task, bounds=bounds).prefix.num_virtual_tokens == 1000
    with pytest.raises(SpecError, match="<= 512, got 1000"):
        parse_spec(ok, base_dir=task)  # the default bound
    for bad, message in [
        ({"training.steps": 2**31}, "training.steps: 2147483648 is over the field's ceiling"),
        ({"training.stepz": 1}, "training.stepz: not a numeric field"),
        ({"training.steps": "10"}, "training.steps: expected an integer, got '10'"),
        ({"data.validation_fraction": 0.9}, "its range is fixed"),
        ({"training.learning_rate": 2}, "over the field's ceiling 1"),
    ]:
        with pytest.raises(ValueError, match=message):
            SpecBounds(bad)


def test_a_stored_spec_over_the_bounds_in_force_is_named(task):
    """What a worker checks before training a queued job: its stored spec against the bounds in force now."""
    stored = parse_spec(spec(steps=30), base_dir=task).to_dict()
    assert SpecBounds().exceeded(stored) == []
    assert SpecBounds({"training.steps": 20}).exceeded(stored) == ["training.steps: 30 is over the bound 20"]
    stored["training"]["learning_rate"] = float("nan")
    assert SpecBounds().exceeded(stored) == ["training.learning_rate: nan is over the bound 1"]


def test_reserved_tags_are_refused_naming_the_field(task):
    with pytest.raises(SpecError) as e:
        parse_spec(
            spec() | {"tags": {"prefixd.champion_decision": "promote", "Prefixd.owner": "x", "ok": "y"}}, base_dir=task
        )
    assert [p.path for p in e.value.problems] == ["tags.prefixd.champion_decision", "tags.Prefixd.owner"]
    assert "the 'prefixd.' prefix is reserved" in e.value.problems[0].message


def test_load_spec_takes_bounds(task):
    (task / "s.yaml").write_text(json.dumps(spec(examples_per_step=64)))
    assert load_spec(Path(task / "s.yaml")).training.examples_per_step == 64
    with pytest.raises(SpecError, match="<= 32, got 64"):
        load_spec(task / "s.yaml", bounds=SpecBounds({"training.examples_per_step": 32}))
