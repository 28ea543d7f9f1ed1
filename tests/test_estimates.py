"""Estimates of whole specs (a tiny model folder), throughput from running jobs, and a running job's finish."""

import json
from types import SimpleNamespace

import pytest

from jobs.spec import load_spec
from orchestrator.estimates import (
    DEFAULT_FLOPS,
    Throughput,
    estimate_spec,
    format_estimate,
    measured_throughput,
)
from tests.tiny import save_tiny_base, write_task


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    root = tmp_path_factory.mktemp("estimate")
    save_tiny_base(root / "tiny")
    write_task(root / "rev.jsonl", "reverse")
    doc = {
        "name": "rev",
        "base_model": {"path": str(root / "tiny")},
        "data": {"train": "rev.jsonl", "input_column": "input", "target_column": "target", "max_length": 40},
        "prefix": {"num_virtual_tokens": 6},
        "training": {"steps": 20, "examples_per_step": 4},
    }
    (root / "rev.yaml").write_text(json.dumps(doc))
    return load_spec(root / "rev.yaml"), root


def test_a_spec_is_estimated_from_its_data_and_model(spec):
    job_spec, root = spec
    report = estimate_spec(job_spec, throughput=Throughput.measured(100.0, "a test"), data_cache=str(root / "c"))
    assert report["steps"] == 20 and report["examples_per_step"] == 4
    assert report["train_rows"] + report["validation_rows"] == 60
    assert report["total_tokens"] == pytest.approx(report["tokens_per_step"] * 20, abs=20 * 0.05 + 1)
    assert report["seconds"] == pytest.approx(report["total_tokens"] / 100.0, abs=0.1)
    assert report["throughput_source"] == "measured: a test"
    assert report["peak_memory_bytes"] == sum(report["memory_bytes"].values())
    text = format_estimate(report)
    assert text.startswith("rev on path:") and f"{report['total_tokens']:,} over 20 steps" in text
    default = estimate_spec(job_spec, throughput=Throughput.default(), data_cache=str(root / "c"))
    assert default["tokens_per_s"] == pytest.approx(DEFAULT_FLOPS / (4 * default["base_parameters"]), rel=1e-3)
    assert "not measured for this base model yet" in default["throughput_source"]


def job(**kw):
    fields = dict(state="running", base_key="b", owner="g1", tokens_per_s=100.0, examples_per_s=2.0)
    return SimpleNamespace(**(fields | dict(step=10, total_steps=30, updated_at=1000.0) | kw))


def test_a_groups_jobs_sum_to_its_throughput():
    running = [job(), job(tokens_per_s=50.0), job(owner="g2", tokens_per_s=400.0), job(base_key="other")]
    rate = measured_throughput(running, "b")
    assert rate.tokens_per_s == 400.0  # groups: g1 150, g2 400; the upper median of two
    assert "2 running group(s)" in rate.source
    assert measured_throughput([job(state="succeeded")], "b").tokens_per_s is None
