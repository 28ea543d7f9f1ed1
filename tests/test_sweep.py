"""A spec's `sweep:` section expands into variants; every problem of the section is named at once."""

import pytest

from jobs.problems import SpecError
from jobs.sweep import MAX_VARIANTS, expand_sweep, new_sweep_id

BASE = {"name": "rev", "training": {"steps": 5, "learning_rate": 0.01}, "prefix": {"num_virtual_tokens": 5}}


def test_a_spec_without_sweep_is_one_variant():
    assert expand_sweep(BASE) == [(None, BASE)]


def test_grid_is_every_combination_in_order():
    doc = BASE | {
        "sweep": {"parameters": {"training.learning_rate": [0.001, 0.01, 0.1], "prefix.projection": [False, True]}}
    }
    variants = expand_sweep(doc)
    assert [label for label, _ in variants] == [
        f"training.learning_rate={lr} prefix.projection={p}"
        for lr in ("0.001", "0.01", "0.1")
        for p in ("false", "true")
    ]
    label, first = variants[1]
    assert "sweep" not in first and first["prefix"] == {"num_virtual_tokens": 5, "projection": True}
    assert first["training"] == {"steps": 5, "learning_rate": 0.001}
    assert BASE["prefix"] == {"num_virtual_tokens": 5}  # the document itself is untouched


def test_random_draws_count_distinct_variants_repeatably():
    sweep = {"method": "random", "count": 4, "seed": 3}
    sweep["parameters"] = {"training.learning_rate": [0.001, 0.003, 0.01], "training.schedule": ["constant", "cosine"]}
    first = expand_sweep(BASE | {"sweep": sweep})
    assert len(first) == 4 and len({label for label, _ in first}) == 4
    assert first == expand_sweep(BASE | {"sweep": sweep})
    assert first != expand_sweep(BASE | {"sweep": sweep | {"seed": 4}})


def test_every_problem_of_the_section_is_named():
    doc = BASE | {
        "sweep": {
            "method": "bayes",
            "parameters": {"data.train": ["a", "b"], "training.learning_rate": [], "prefix.init": ["zero", "zero"]},
            "count": 0,
            "budget": 3,
        }
    }
    with pytest.raises(SpecError) as e:
        expand_sweep(doc, "s.yaml")
    paths = {p.path for p in e.value.problems}
    assert paths == {
        "sweep.method",
        "sweep.budget",
        "sweep.count",
        "sweep.parameters.data.train",
        "sweep.parameters.training.learning_rate",
        "sweep.parameters.prefix.init",
    }, e.value
    assert "cannot be swept; accepted: training.learning_rate" in str(e.value)


def test_sweeps_are_bounded():
    values = list(range(1, MAX_VARIANTS + 2))
    with pytest.raises(SpecError, match=f"at most {MAX_VARIANTS} per sweep"):
        expand_sweep(BASE | {"sweep": {"parameters": {"prefix.num_virtual_tokens": values}}})
    with pytest.raises(SpecError, match="required with method random"):
        expand_sweep(BASE | {"sweep": {"method": "random", "parameters": {"training.seed": [1, 2]}}})
    with pytest.raises(SpecError, match="the grid has 3 variants, over count 2"):
        expand_sweep(BASE | {"sweep": {"count": 2, "parameters": {"training.seed": [1, 2, 3]}}})
    assert new_sweep_id() != new_sweep_id() and new_sweep_id().startswith("sweep-")


def test_every_variant_is_validated_and_a_bad_value_is_named_in_the_sweep(tmp_path):
    from jobs.spec import parse_specs
    from tests.tiny import write_task

    write_task(tmp_path / "rev.jsonl", "reverse")
    doc = {
        "name": "rev",
        "base_model": {"builtin": "smollm2-135m"},
        "data": {"train": "rev.jsonl", "input_column": "input", "target_column": "target", "max_length": 40},
        "training": {"steps": 5},
        "sweep": {"parameters": {"training.learning_rate": [0.01, 0.1], "prefix.num_virtual_tokens": [4, 8]}},
    }
    specs = parse_specs(doc, base_dir=tmp_path)
    assert [(s.training.learning_rate, s.prefix.num_virtual_tokens) for _, s in specs] == [
        (0.01, 4),
        (0.01, 8),
        (0.1, 4),
        (0.1, 8),
    ]
    assert {s.name for _, s in specs} == {"rev"} and specs[0][
        0
    ] == "training.learning_rate=0.01 prefix.num_virtual_tokens=4"
    doc["sweep"]["parameters"]["training.learning_rate"] = [0.01, 5.0]
    doc["training"]["steps"] = 0
    with pytest.raises(SpecError) as e:
        parse_specs(doc, base_dir=tmp_path)
    assert [str(p) for p in e.value.problems] == [
        "training.steps: must be >= 1 and <= 100000, got 0",
        "sweep.parameters.training.learning_rate: must be > 0 and <= 1, got 5.0",
    ], e.value
    plain = {k: v for k, v in doc.items() if k != "sweep"} | {"training": {"steps": 3}}
    [(label, one)] = parse_specs(plain, base_dir=tmp_path)
    assert label is None and one.training.steps == 3
