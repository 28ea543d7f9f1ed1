"""Smoke tests of the benchmarks: each runs as a real script, `--tiny --quick`, and prints its tables.

Only the shape of the output is checked (rows, ratios, PASS/MISS), never timing values; the one numeric
check is the one the math fixes: prefixd and PEFT give the same loss and prefix gradient on the same weights.
"""

import json
import os
import re
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import multitask  # noqa: E402
import prefix_overhead  # noqa: E402

NUMBER = r"\d+\.\d+"
RESULT = r"(PASS|MISS)"


def run_script(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_prefix_overhead_quick(tmp_path):
    out_file = tmp_path / "overhead.json"
    out = run_script("prefix_overhead.py", "--tiny", "--quick", "--json", str(out_file))
    assert re.search(
        r"^variant \(forward\+backward\)\s+cpu s\s+wall s\s+wall min\s+wall max\s+tokens/s \(cpu\)$", out, re.M
    ), out
    for variant in ("plain", "shared", "mixed", "peft"):  # cpu, wall, wall min, wall max, tokens/s
        assert re.search(rf"^{variant}: .*\s{NUMBER}" + rf"\s+{NUMBER}" * 3 + r"\s+\d+$", out, re.M), (variant, out)
    for label, bound in (
        ("(a) prefix P=10 / no prefix", "1.10"),
        ("(b) mixed prefixes / 1 shared", "1.05"),
        ("(c) prefixd / PEFT", "1.00"),
    ):  # cpu ratio, IQR, wall ratio, IQR, target, result
        assert re.search(
            rf"^{re.escape(label)}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+<= {re.escape(bound)}"
            rf"\s+{RESULT}$",
            out,
            re.M,
        ), (label, out)
    report = json.loads(out_file.read_text())
    assert set(report["median_s"]["cpu"]) == set(report["median_s"]["wall"]) == {"plain", "shared", "mixed", "peft"}
    assert all(len(t) == 2 for t in report["times_s"]["wall"].values())  # --quick: 2 rounds
    assert [c["result"] in ("PASS", "MISS") for c in report["comparisons"]] == [True] * 3
    assert report["checks"]["loss_abs_diff"] < 1e-5  # same weights, same inputs: same loss as PEFT
    assert report["checks"]["prefix_grad_max_abs_diff"] < 1e-6


def test_multitask_quick(tmp_path):
    out_file = tmp_path / "multitask.json"
    out = run_script("multitask.py", "--tiny", "--quick", "--compare-eager", "--device", "cpu", "--json", str(out_file))
    header = re.search(
        r"^N\s+steps\s+\(a\) tok/s\s+\(a0\) tok/s\s+a/a0\s+\(b\) tok/s\s+wall a/b\s+cpu a/b\s+.*"
        r"\(a\) RSS / N=1$",
        out,
        re.M,
    )
    assert header, out
    for n in (1, 2):  # --quick: N = 1, 2, one step; then 15 columns: 10 numbers, 2 percentages, 3 numbers
        row = rf"^{n}\s+1" + rf"\s+{NUMBER}" * 10 + r"\s+\d+%" * 2 + rf"\s+{NUMBER}" * 3 + "$"
        assert re.search(row, out, re.M), (n, out)
    for what, bound in (
        ("\\(a\\) tokens/s / \\(b\\) tokens/s", ">= 1.15"),
        ("\\(a\\) FLOP/s / matmul FLOP/s", ">= 0.75"),
        ("\\(a\\) peak RSS / single-task run \\(N=1\\)", "<= 1.20"),
    ):
        assert re.search(rf"^N=2: {what}\s+{NUMBER}\s+{re.escape(bound)}\s+{RESULT}$", out, re.M), (what, out)
    report = json.loads(out_file.read_text())
    assert [s["n"] for s in report["summary"]] == [1, 2]
    for s in report["summary"]:
        assert s["a_tokens_per_s"] > 0 and s["b_tokens_per_s"] > 0 and s["matmul_gflops"] > 0
        assert (
            s["a_peak_rss_bytes"] > 0
            and s["c_peak_rss_bytes"] == s["n"] * report["raw"]["peft_single"]["peak_rss_bytes"]
        )
    # every step trained N tasks x 4 rows x 16 tokens, in (a) and in (b) alike
    raw = report["raw"]["joint"]["2"]
    assert raw["a_tokens"] == raw["b_tokens"] == [2 * 4 * 16]
    # the reference matmul was sampled before each of (a)'s micro-batches (one per task at 4 rows), and
    # the sampling time was taken out of (a)'s
    assert len(raw["matmul_gflops_during_a"]) == 2 and len(raw["a_sampling_s"]) == 1
    # ... and before each of (b)'s task-steps, outside its timing: the ratio at equal machine speed
    assert [len(r) for r in raw["matmul_during_a_by_round"]] == [len(r) for r in raw["matmul_during_b_by_round"]] == [2]
    two = report["summary"][1]
    assert two["speedup_by_round"] == [pytest.approx(two["speedup_a_over_b"])]
    mm_a, mm_b = (statistics.median(x["cpu"] for x in raw[f"matmul_during_{side}_by_round"][0]) for side in "ab")
    assert two["speedup_at_equal_matmul_rate"] == pytest.approx(two["speedup_a_over_b"] * mm_b / mm_a)
    assert re.search(r"^N=2 speed-up by round: [\d.]+; at eq. mm: [\d.]+$", out, re.M), out
    assert 0 < raw["a_sampling_s"][0] and all(t > 0 for t in raw["a_cpu_s"])
    assert 0 < report["summary"][1]["a_executed_gflops"] < report["summary"][1]["a_gflops"]
    assert all(0 <= s["a_outside_step_time_share"] < 1 for s in report["summary"])  # sampling left out of both
    # (a) ran with compiled layers, (a0) the same tasks eagerly in the same rounds
    assert report["config"]["compiled_layers"] and all(s["a_compiled"] for s in report["summary"])
    assert raw["a0_tokens"] == raw["a_tokens"] and all(s["speedup_a_over_a0"] > 0 for s in report["summary"])


def test_matmul_reference_weighs_rounds_by_time():
    """A slow round (low matmul rate, long step) counts for its time: the share then lies within the
    per-round shares, which the median of all samples does not guarantee."""
    joint = {
        "a_cpu_s": [1.0, 3.0],
        "matmul_during_a_by_round": [[{"cpu": 100.0}] * 3, [{"cpu": 200.0}, {"cpu": 190.0}, {"cpu": 900.0}]],
    }
    assert multitask.reference_rate_during_a(joint, "cpu") == pytest.approx((1 * 100 + 3 * 200) / 4)
    flops = [80.0, 450.0]  # per round: shares 0.80 and 0.75
    shares = [f / (t * m) for f, t, m in zip(flops, joint["a_cpu_s"], (100.0, 200.0))]
    pooled = sum(flops) / sum(joint["a_cpu_s"]) / multitask.reference_rate_during_a(joint, "cpu")
    assert min(shares) <= pooled <= max(shares)


def test_compiled_kernels_quick():
    out = run_script("compiled_kernels.py", "--quick")
    diffs = re.findall(r"outputs and gradients differ by at most (\d\.\de[-+]\d+)\)$", out, re.M)
    assert len(diffs) == 2 and all(float(d) < 1e-5 for d in diffs), out  # both variants compute the same thing
    for before, now in (("boolean mask", "additive mask"), ("F.cross_entropy", "written-out backward")):
        assert re.search(rf"^{before} \(before\)\s+{NUMBER}$", out, re.M), out
        assert re.search(rf"^{now} \(now\)\s+{NUMBER}\s+{NUMBER}$", out, re.M), out


def test_matmul_rows_quick():
    out = run_script("matmul_rows.py", "--quick")
    for rows in (256, 512):
        assert re.search(rf"^{rows}" + rf"\s+{NUMBER}" * 4 + r"\s+\d+%$", out, re.M), out


PARSERS = {
    "benchmarks/prefix_overhead.py": prefix_overhead.build_parser,
    "benchmarks/multitask.py": multitask.build_parser,
}


def readme_commands() -> list[list[str]]:
    """The README's command lines for these two scripts (other benchmarks have their own tests)."""
    text = (BENCH / "README.md").read_text(encoding="utf-8")
    commands = [
        shlex.split(line.strip().split("#")[0])
        for line in text.splitlines()
        if line.strip().startswith("python benchmarks/")
    ]
    return [c for c in commands if c[1] in PARSERS]


def test_readme_commands_parse():
    commands = readme_commands()
    assert {c[1] for c in commands} == set(PARSERS)
    for command in commands:
        PARSERS[command[1]]().parse_args(command[2:])  # exits (fails the test) on an unknown flag


@pytest.mark.parametrize("argv", [["--tasks", "1,x"], ["--tasks", "0"], ["--steps", "0"]])
def test_multitask_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit):
        multitask.main(argv)
    assert "--tasks" in capsys.readouterr().err


def test_multitask_refuses_to_compare_eager_with_eager(capsys):
    with pytest.raises(SystemExit):
        multitask.main(["--eager", "--compare-eager"])
    assert "--compare-eager" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------
# The GPU side: multitask_gpu.py's protocol run on the CPU, and benchmarks/gpu_check.sh in smoke mode


def test_multitask_gpu_protocol_runs_on_the_cpu(tmp_path):
    """multitask_gpu.main is device-generic: on the CPU it runs the GPU protocol (one process, (a) and (b)
    per N, peak memory per variant) with RSS for memory. The table, the targets and the JSON are checked."""
    out_file = tmp_path / "gpu.json"
    code = (
        "import sys; sys.path.insert(0, 'benchmarks'); import multitask, multitask_gpu; "
        f"args = multitask.build_parser().parse_args(['--tiny', '--quick', '--json', {str(out_file)!r}]); "
        "args.seq_len = 16; multitask_gpu.main(args, [1, 2], device='cpu')"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^multitask \(cpu\): tiny Llama .* float32 base, fp32 prefixes; cpu", out, re.M), out
    assert re.search(
        r"^N\s+steps\s+\(a\) tok/s\s+\(b\) tok/s\s+a/b\s+\(a\) TFLOP/s\s+\(a\) peak GiB\s+"
        r"\(b\) peak GiB\s+\(c\) peak GiB\s+\(a\) peak / N=1$",
        out,
        re.M,
    ), out
    for n in (1, 2):  # --quick: one round; 8 numbers
        assert re.search(rf"^{n}\s+1" + rf"\s+{NUMBER}" * 8 + "$", out, re.M), (n, out)
    for what, bound in (
        ("(a) tokens/s / (b) tokens/s", ">= 1.50"),
        ("(a) peak memory / single-task run (N=1)", "<= 1.20"),
    ):
        assert re.search(rf"^N=2: {re.escape(what)}\s+{NUMBER}\s+{re.escape(bound)}\s+{RESULT}$", out, re.M), (
            what,
            out,
        )
    report = json.loads(out_file.read_text())
    assert report["config"]["device"] == "cpu" and report["config"]["compiled_layers"]
    assert [s["n"] for s in report["summary"]] == [1, 2]
    raw = report["raw"]["joint"]["2"]
    assert raw["a_tokens"] == raw["b_tokens"] == [2 * 4 * 16]  # N tasks x 4 rows x 16 tokens in (a) and (b)
    assert all(s["a_compiled"] and s["a_tokens_per_s"] > 0 and s["b_tokens_per_s"] > 0 for s in report["summary"])
    two = report["summary"][1]
    assert two["c_peak_bytes"] == 2 * report["raw"]["peft_single"]["peak_bytes"]
    assert two["speedup_a_over_b"] == pytest.approx(two["a_tokens_per_s"] / two["b_tokens_per_s"])
    assert two["speedup_by_round"] == [pytest.approx(two["speedup_a_over_b"])]


def test_multitask_device_and_dtype_arguments(capsys):
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            multitask.main(["--device", "cuda", "--tiny", "--quick"])
        assert (
            "--device: device 'cuda': this machine has no CUDA device visible; accepted here: auto, cpu"
            in capsys.readouterr().err
        )
    with pytest.raises(SystemExit):
        multitask.main(["--device", "cpu", "--dtype", "bfloat16", "--tiny", "--quick"])
    assert "--dtype bfloat16: the CPU run is fp32" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        multitask.build_parser().parse_args(["--shape", "llama-7b"])
    assert "invalid choice: 'llama-7b'" in capsys.readouterr().err


def run_gpu_check(tmp_path, *args, **env):
    environment = dict(os.environ, PYTHON=sys.executable, OUT=str(tmp_path)) | env
    return subprocess.run(
        ["bash", str(BENCH / "gpu_check.sh"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=environment,
    )


def test_gpu_check_smoke(tmp_path):
    """The whole script in smoke mode: environment, the gpu tests (skipped without a GPU), a CPU benchmark."""
    proc = run_gpu_check(tmp_path, "--smoke")
    out = proc.stdout
    assert proc.returncode == 0, out[-4000:] + proc.stderr[-2000:]
    for step in ("environment", "gpu-tests", "multitask-smoke"):
        assert re.search(rf"^== {step} \(timeout \d+s, at \d+s\)$", out, re.M), (step, out)
        assert re.search(rf"^gpu_check: {step} rc=0$", out, re.M), (step, out)
    assert re.search(r"^torch\s+\d+\.\d+", out, re.M) and re.search(r"^transformers\s+5\.", out, re.M), out
    assert re.search(r"^gpu_check: total \d+s; results in " + re.escape(str(tmp_path)) + "$", out, re.M), out
    assert (tmp_path / "gpu_check.log").read_text().strip().endswith("gpu_check: multitask-smoke rc=0")
    suite = ElementTree.parse(tmp_path / "gpu_tests.xml").getroot().find("testsuite")
    gpu_tests = int(suite.get("tests"))
    assert gpu_tests >= 7 and suite.get("failures") == suite.get("errors") == "0"
    import torch

    if not torch.cuda.is_available():
        assert "cuda available: False" in out and int(suite.get("skipped")) == gpu_tests
    report = json.loads((tmp_path / "multitask_smoke.json").read_text())
    assert [s["n"] for s in report["summary"]] == [1, 2]


def test_gpu_check_arguments(tmp_path):
    proc = run_gpu_check(tmp_path, "--fast")
    assert proc.returncode == 2 and "unknown argument '--fast'; accepted: --smoke" in proc.stderr
    empty = tmp_path / "no-wheels"
    empty.mkdir()
    proc = run_gpu_check(tmp_path, GPU_CHECK_SMOKE="0", GPU_CHECK_WHEELS=str(empty))  # only --smoke runs without
    assert proc.returncode == 1 and f"no wheels in {empty}/; run 'bash benchmarks/fetch_gpu_wheels.sh'" in proc.stdout


def test_sweep_quick(tmp_path):
    """Four variants jointly and one at a time: the same final metrics, so the same best variant."""
    out_file = tmp_path / "sweep.json"
    out = run_script("sweep.py", "--quick", "--json", str(out_file))
    report = json.loads(out_file.read_text())
    assert len(report["variants"]) == 4 and report["metric"] == "eval_loss"
    assert report["largest_metric_difference"] < 1e-5, out
    assert report["best"]["joint"] == report["best"]["sequential"]
    assert re.search(r"^4 variants of rev \(eval_loss, minimize\): \(a\) [\d.]+ s, \(b\) [\d.]+ s, b/a", out, re.M), out


def test_estimate_quick(tmp_path):
    """The estimate's tokens are exact against a real run; time and memory errors are reported, not judged."""
    out_file = tmp_path / "estimate.json"
    out = run_script("estimate.py", "--quick", "--json", str(out_file))
    report = json.loads(out_file.read_text())
    first, second = report["specs"]
    assert first["relative_error"]["tokens"] == 0 == second["relative_error"]["tokens"], out
    assert "not measured" in first["estimate"]["throughput_source"]
    assert second["estimate"]["throughput_source"] == "measured: the run of rev"
    assert re.search(r"^rev\s+\d+ / \d+\s+[\d.]+ / [\d.]+\s+[+-]\d+%", out, re.M), out


def test_serving_quick(tmp_path):
    """benchmarks/serving.py --tiny --quick: every variant answers, the pyfunc model agrees with the server
    (the script exits otherwise), and the table and targets are printed."""
    out_file = tmp_path / "serving.json"
    out = run_script("serving.py", "--tiny", "--quick", "--concurrency", "8", "--json", str(out_file))
    for variant in ("served-1", "served-8", "served-16", "one-at-a-time", "pyfunc-8"):
        assert re.search(rf"^{variant}\s+{NUMBER}\s+{NUMBER}\s+{NUMBER}\s+\d+$", out, re.M), (variant, out)
    for label in ("served-16 / served-1 throughput", "served-16 / one-at-a-time throughput"):
        assert re.search(rf"^{re.escape(label)}\s+{NUMBER}\s+>= \d\.\d\d\s+{RESULT}$", out, re.M), (label, out)
    report = json.loads(out_file.read_text())
    assert set(report["variants"]) == {"served-1", "served-8", "served-16", "one-at-a-time", "pyfunc-8"}
    assert all(v["tokens_per_s"] > 0 and v["p95_s"] >= v["p50_s"] > 0 for v in report["variants"].values())


def test_eval_share_quick(tmp_path):
    """Two evaluation bounds over the same jobs: each setting's evaluation time is reported as a share."""
    out_file = tmp_path / "eval_share.json"
    out = run_script("eval_share.py", "--quick", "--max-rows", "16", "100000", "--json", str(out_file))
    report = json.loads(out_file.read_text())
    assert [r["eval_max_rows"] for r in report["results"]] == [16, 100000] and report["validation_rows"] == 200
    assert all(r["wall_s"] >= r["train_s"] > 0 for r in report["results"]), report
    assert re.search(r"^16\s+[\d.]+\s+[\d.]+\s+[\d.]+\s+\d+%$", out, re.M), out
