"""The `prefixd` CLI in-process (`main([...])`): exit codes, output, --json, and what reaches the store.

Uses the example specs (built-in SmolLM2: validating them loads no model) and a fresh home per test.
Training commands (`run`, killed and restarted) are tested in test_orchestrator.py.
"""

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.spec import spec_json_schema
from orchestrator import cli
from orchestrator.cli import COMMANDS, build_parser, main
from orchestrator.commands import serving
from orchestrator.commands.common import CommandError, clock, config_from_args
from orchestrator.store import JobStore

EXAMPLES = Path(__file__).resolve().parent.parent / "jobs" / "examples"
PAST_TENSE, REVERSE = str(EXAMPLES / "past_tense.yaml"), str(EXAMPLES / "reverse_words.yaml")


@pytest.fixture
def home(tmp_path, monkeypatch):
    for name in ("PREFIXD_HOME", "PREFIXD_STORE_URL", "PREFIXD_RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "home"


def run(capsys, *argv):
    """(exit code, stdout, stderr) of `prefixd ARGV`."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def bad_spec(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: Bad Name\nbase_model: {builtin: smollm2-135m}\n"
        "data: {train: missing.jsonl, input_column: q, target_column: a}\n"
        "training: {steps: 0}\nextra_key: 1\n"
    )
    return str(path)


def _subcommands(parser: argparse.ArgumentParser) -> set[str]:
    [action] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(action.choices)


def test_command_table_matches_the_parser():
    assert _subcommands(build_parser()) == set(COMMANDS)
    for name, (function, help_text, add_arguments) in COMMANDS.items():
        assert callable(function) and callable(add_arguments) and help_text, name
    assert {
        "validate",
        "submit",
        "run",
        "serve",
        "status",
        "cancel",
        "logs",
        "schema",
        "lookup",
        "models",
        "generate",
    } <= set(COMMANDS)


def test_validate(home, capsys, bad_spec):
    code, out, err = run(capsys, "--home", str(home), "validate", PAST_TENSE, REVERSE)
    assert code == 0 and err == ""
    assert out.splitlines() == [
        f"{PAST_TENSE}: ok (past-tense, base builtin:smollm2-135m:float32)",
        f"{REVERSE}: ok (reverse-words, base builtin:smollm2-135m:float32)",
    ]

    code, out, err = run(capsys, "validate", PAST_TENSE, bad_spec)
    assert code == 1
    for problem in (
        "name:",
        "data.train: no such file 'missing.jsonl'",
        "training.steps: must be >= 1",
        "extra_key: unknown key",
    ):
        assert problem in err, (problem, err)
    assert "Traceback" not in err

    code, out, _ = run(capsys, "validate", "--json", PAST_TENSE, bad_spec)
    rows = json.loads(out)
    assert code == 1 and [r["valid"] for r in rows] == [True, False]
    assert len(rows[1]["problems"]) >= 4 and rows[0]["name"] == "past-tense"
    assert not home.exists()  # validating touches no state


def test_submit_status_cancel_logs(home, capsys):
    code, out, err = run(capsys, "--home", str(home), "submit", PAST_TENSE, REVERSE)
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [(name, path) for _, name, path in lines] == [("past-tense", PAST_TENSE), ("reverse-words", REVERSE)]
    past, reverse = [job_id for job_id, _, _ in lines]

    code, out, _ = run(capsys, "--home", str(home), "status", "--json")
    jobs = json.loads(out)
    assert code == 0 and [(j["id"], j["task"], j["state"]) for j in jobs] == [
        (past, "past-tense", "queued"),
        (reverse, "reverse-words", "queued"),
    ]
    assert jobs[1]["priority"] == 10 and jobs[0]["spec"]["training"]["steps"] == 60
    assert jobs[0]["base_key"] == "builtin:smollm2-135m:float32"

    code, out, _ = run(capsys, "status", reverse, "--json", "--home", str(home))  # global flags after the command
    assert code == 0 and json.loads(out)["id"] == reverse

    code, out, _ = run(capsys, "--home", str(home), "status")
    assert code == 0 and out.splitlines()[0].split() == ["ID", "NAME", "STATE", "STEP", "LOSS", "ATTEMPTS", "UPDATED"]
    assert past in out and "queued" in out

    code, out, _ = run(capsys, "--home", str(home), "status", past)
    assert code == 0 and "state:" in out and "past-tense" in out

    code, out, _ = run(capsys, "--home", str(home), "cancel", past)
    assert code == 0 and out.strip() == f"{past}: cancelled"
    code, out, _ = run(capsys, "--home", str(home), "status", past, "--json")
    assert json.loads(out)["state"] == "cancelled"
    code, out, _ = run(capsys, "--home", str(home), "list", "--state", "queued", "--json")
    assert [j["id"] for j in json.loads(out)] == [reverse]

    code, out, _ = run(capsys, "--home", str(home), "logs", past)
    assert code == 0 and "submitted: task past-tense" in out and out.rstrip().endswith("cancelled")
    code, out, _ = run(capsys, "--home", str(home), "logs", past, "--json")
    assert [e["message"] for e in json.loads(out)][-1] == "cancelled"

    code, out, err = run(capsys, "--home", str(home), "submit", "--json", PAST_TENSE)
    assert code == 0 and [j["name"] for j in json.loads(out)] == ["past-tense"]


def test_user_errors_are_one_line_without_traceback(home, capsys):
    for argv in (["cancel", "j-nope"], ["logs", "j-nope"], ["status", "j-nope"]):
        code, out, err = run(capsys, "--home", str(home), *argv)
        assert code == 1 and out == ""
        assert err.startswith(f"prefixd {argv[0]}: error: no job with id 'j-nope'") and "Traceback" not in err

    code, out, _ = run(capsys, "--home", str(home), "submit", PAST_TENSE)
    [job_id] = [line.split("\t")[0] for line in out.splitlines()]
    run(capsys, "--home", str(home), "cancel", job_id)
    assert run(capsys, "--home", str(home), "cancel", job_id)[0] == 0  # asking again changes nothing
    run(capsys, "--home", str(home), "submit", REVERSE)
    with JobStore(f"sqlite:///{home / 'jobs.db'}") as store:
        [done] = store.claim("test")
        store.finish(done.id, "succeeded")
    code, _, err = run(capsys, "--home", str(home), "cancel", done.id)
    assert code == 1 and f"cannot cancel job {done.id}: it is succeeded" in err

    code, _, err = run(capsys, "--home", str(home), "status", "--bogus")
    assert code == 2 and "unrecognized arguments: --bogus" in err
    code, _, err = run(capsys, "--home", str(home), "frobnicate")
    assert code == 2 and "invalid choice" in err
    code, _, err = run(capsys, "--store-url", "nosuchdb://x", "status")
    assert code == 1 and "cannot open the job store" in err and "Traceback" not in err


def test_invalid_submit_stores_nothing(home, capsys, bad_spec):
    code, out, err = run(capsys, "--home", str(home), "submit", PAST_TENSE, bad_spec)
    assert code == 1 and out == ""
    assert "training.steps: must be >= 1" in err and "nothing was submitted" in err
    code, out, _ = run(capsys, "--home", str(home), "status", "--json")
    assert code == 0 and json.loads(out) == []


def test_home_and_store_url_from_flags_and_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PREFIXD_HOME", str(tmp_path / "env-home"))
    monkeypatch.delenv("PREFIXD_STORE_URL", raising=False)
    assert run(capsys, "submit", PAST_TENSE)[0] == 0
    assert (tmp_path / "env-home" / "jobs.db").is_file()

    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    assert run(capsys, "--store-url", url, "submit", REVERSE)[0] == 0
    code, out, _ = run(capsys, "--store-url", url, "status", "--json")
    assert [j["task"] for j in json.loads(out)] == ["reverse-words"]
    code, out, _ = run(capsys, "status", "--json")
    assert [j["task"] for j in json.loads(out)] == ["past-tense"]


def test_schema(capsys):
    code, out, _ = run(capsys, "schema")
    assert code == 0 and json.loads(out) == spec_json_schema()


def test_run_with_an_empty_queue_starts_nothing(home, capsys):
    code, out, _ = run(capsys, "--home", str(home), "run")
    assert code == 0 and out.startswith("nothing to run")
    assert "ray" not in sys.modules or not __import__("ray").is_initialized()


def test_job_commands_and_help_import_neither_mlflow_nor_torch(home):
    """The registry commands' arguments are defined beside the job commands; MLflow and torch (seconds to
    import) load only when a registry command runs on this machine."""
    script = (
        "import sys; from orchestrator.cli import main; "
        f"codes = [main(['--home', {str(home)!r}, 'status']), main(['lookup', '--help']), main(['--help'])]; "
        "print(codes, sorted(m for m in ('mlflow', 'torch', 'transformers') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[0, 0, 0] []"


def test_output_cut_short_by_its_reader_ends_quietly(home, capsys):
    """`prefixd status | head -1`: the reader goes away, the command ends without a traceback (exit 141)."""
    for _ in range(3):
        assert run(capsys, "--home", str(home), "submit", PAST_TENSE, REVERSE)[0] == 0
    command = [sys.executable, "-m", "orchestrator.cli", "--home", str(home), "status"]
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    child.stdout.close()  # before the child has started: its first write finds no reader
    err = child.stderr.read().decode()
    assert child.wait(timeout=120) == 141 and err == "", err
    # The same with a reader that takes the first line only.
    head = subprocess.run(
        f"{shlex.join(command)} | head -1", shell=True, capture_output=True, text=True, timeout=120, env=_env()
    )
    assert head.stdout.split() == ["ID", "NAME", "STATE", "STEP", "LOSS", "ATTEMPTS", "UPDATED"]
    assert head.stderr == ""


def _env() -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH, for `python -m orchestrator.cli`."""
    root = str(Path(__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


# ---- --server: the same commands through a real HTTP API (orchestrator.api_server.start_api on 127.0.0.1) ---------

TOKEN = "cli-test-token-41d2"


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """A started API over a fresh home; its data root is jobs/examples, so the example specs' relative paths
    mean the same files on the server as here."""
    from orchestrator.api_server import start_api
    from orchestrator.config import OrchestratorConfig, default_tracking_uri

    home = tmp_path_factory.mktemp("server-home")
    config = OrchestratorConfig.from_env(
        home=home, store_url=f"sqlite:///{home / 'jobs.db'}", mlflow_uri=default_tracking_uri(home)
    )
    handle = start_api(config, port=0, tokens=frozenset({TOKEN}), data_root=EXAMPLES)
    yield handle, config
    handle.stop()


@pytest.fixture
def remote(api, home, monkeypatch):
    """(server URL, the server's store URL) with PREFIXD_TOKEN set and PREFIXD_SERVER unset."""
    monkeypatch.setenv("PREFIXD_TOKEN", TOKEN)
    monkeypatch.delenv("PREFIXD_SERVER", raising=False)
    handle, config = api
    return handle.url, config.store_url


def sweep_spec(tmp_path: Path) -> str:
    """The reverse-words example with a 2 x 2 sweep over learning rate and prefix length."""
    import yaml

    doc = yaml.safe_load((EXAMPLES / "reverse_words.yaml").read_text())
    for key in ("train", "validation"):
        doc["data"][key] = str(EXAMPLES / doc["data"][key])
    doc["sweep"] = {"parameters": {"training.learning_rate": [0.01, 0.03], "prefix.num_virtual_tokens": [5, 10]}}
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def test_a_sweep_is_validated_submitted_and_shown_side_by_side(home, capsys, tmp_path):
    spec = sweep_spec(tmp_path)
    code, out, _ = run(capsys, "--home", str(home), "validate", spec)
    assert (
        code == 0
        and out.strip() == f"{spec}: ok (reverse-words, base builtin:smollm2-135m:float32, a sweep of 4 variants)"
    )
    code, out, err = run(capsys, "--home", str(home), "submit", "--json", spec)
    assert code == 0, err
    rows = json.loads(out)
    [sweep_id] = {r["sweep_id"] for r in rows}
    assert (
        len(rows) == 4
        and sweep_id.startswith("sweep-")
        and rows[1]["sweep_variant"] == ("training.learning_rate=0.01 prefix.num_virtual_tokens=10")
    )
    store = JobStore(f"sqlite:///{home / 'jobs.db'}")
    jobs = store.list(sweep=sweep_id)
    assert [j.spec["prefix"]["num_virtual_tokens"] for j in jobs] == [5, 10, 5, 10]
    store.claim("o", limit=2)
    store.update_progress(jobs[0].id, step=20, total_steps=60, eval={"eval_loss": 2.5})
    store.update_progress(jobs[1].id, step=20, total_steps=60, eval={"eval_loss": 1.5})
    code, out, _ = run(capsys, "--home", str(home), "status", "--sweep", sweep_id)
    lines = out.splitlines()
    assert code == 0 and lines[0].split() == ["ID", "VARIANT", "STATE", "STEP", "LOSS", "EVAL_LOSS", "AT", "STEP"]
    assert f"{jobs[1].id} *" in lines[2] and "1.5000" in lines[2] and "20" in lines[2]
    assert lines[-1].startswith("* best so far by eval_loss (minimize)")


def test_estimate_says_what_a_spec_will_cost(home, capsys, tmp_path):
    code, out, err = run(capsys, "--home", str(home), "estimate", "--json", REVERSE)
    assert code == 0, err
    [report] = json.loads(out)
    assert report["steps"] == 60 and report["total_tokens"] > 60 * report["examples_per_step"]
    assert "not measured for this base model yet" in report["throughput_source"]
    code, out, _ = run(capsys, "--home", str(home), "estimate", REVERSE)
    assert f"tokens    {report['total_tokens']:,} over 60 steps" in out


def test_commands_are_sorted_by_what_they_do_with_a_server():
    groups = [set(cli.SERVER_COMMANDS), set(cli.SERVER_IGNORED), set(cli.SERVER_REFUSED)]
    assert set().union(*groups) == set(COMMANDS) and sum(map(len, groups)) == len(COMMANDS)


def test_registry_arguments_parse():
    parser = build_parser()
    a = parser.parse_args(["lookup", "rev", "--version", "3", "--json", "--mlflow-uri", "http://x"])
    assert (a.mlflow_uri, a.task, a.version, a.alias, a.json, a.download) == ("http://x", "rev", 3, None, True, None)
    a = parser.parse_args(["models", "--base", "builtin:smollm2-135m", "--tag", "team=nlp", "--tag", "k=v"])
    assert (getattr(a, "mlflow_uri", None), a.base, a.tag) == (None, "builtin:smollm2-135m", ["team=nlp", "k=v"])
    a = parser.parse_args(["generate", "--task", "a", "--task", "b", "--max-new-tokens", "5", "p1", "p2"])
    assert (a.tasks, a.alias, a.version, a.max_new_tokens, a.prompts) == (["a", "b"], None, None, 5, ["p1", "p2"])
    for argv in (["lookup", "rev", "--alias", "a", "--version", "1"], ["lookup", "rev", "--version", "0"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_server_submit_status_list_cancel_logs_match_local_output(remote, capsys, tmp_path):
    url, store_url = remote
    code, out, err = run(capsys, "--server", url, "submit", PAST_TENSE, REVERSE)
    assert code == 0, err
    lines = [line.split("\t") for line in out.splitlines()]
    assert [(name, path) for _, name, path in lines] == [("past-tense", PAST_TENSE), ("reverse-words", REVERSE)]
    past, reverse = [job_id for job_id, _, _ in lines]
    with JobStore(store_url) as store:
        train = Path(store.get(past).spec["data"]["train"])  # found beside the spec here: uploaded
        assert train.name == "data.jsonl" and train.parent.parent.parent.name == "files"
        assert train.read_bytes() == (EXAMPLES / "past_tense.jsonl").read_bytes()

    # Every read command prints exactly what it prints on the server's own store.
    for argv in (
        ["status"],
        ["status", "--json"],
        ["status", past],
        ["status", reverse, "--json"],
        ["list", "--state", "queued", "--limit", "1", "--json"],
        ["logs", past],
        ["logs", past, "--json"],
    ):
        remote_out = run(capsys, "--server", url, *argv)
        assert remote_out == run(capsys, "--store-url", store_url, *argv), argv
        assert remote_out[0] == 0 and remote_out[1], argv

    code, out, _ = run(capsys, "cancel", past, "--server", url)  # the flag after the command works too
    assert code == 0 and out.strip() == f"{past}: cancelled"
    code, out, _ = run(capsys, "--server", url, "status", past, "--json")
    assert json.loads(out)["state"] == "cancelled"
    code, out, _ = run(capsys, "--server", url, "logs", past)
    assert out.rstrip().endswith("cancelled")

    code, out, _ = run(capsys, "--server", url, "submit", "--json", "--max-attempts", "5", PAST_TENSE)
    [row] = json.loads(out)
    assert code == 0 and (row["name"], row["spec"], row["priority"]) == ("past-tense", PAST_TENSE, 0)
    assert row["base_key"] == "builtin:smollm2-135m:float32"
    with JobStore(store_url) as store:
        assert store.get(row["id"]).max_attempts == 5


def test_server_sweep_and_estimate_match_local_output(remote, capsys, tmp_path):
    url, store_url = remote
    spec = sweep_spec(tmp_path)
    code, out, err = run(capsys, "--server", url, "submit", spec)
    assert code == 0, err
    lines = out.splitlines()
    assert (
        len(lines) == 5
        and lines[-1].startswith("sweep sweep-")
        and lines[0].endswith("\ttraining.learning_rate=0.01 prefix.num_virtual_tokens=5")
    )
    sweep_id = lines[-1].split()[1].rstrip(":")
    remote_out = run(capsys, "--server", url, "status", "--sweep", sweep_id)
    assert remote_out == run(capsys, "--store-url", store_url, "status", "--sweep", sweep_id)
    assert len(remote_out[1].splitlines()) == 5  # the header and four variants
    code, out, err = run(capsys, "--server", url, "estimate", "--json", REVERSE)
    assert code == 0, err
    [remote_report] = json.loads(out)
    code, out, _ = run(capsys, "--store-url", store_url, "estimate", "--json", REVERSE)
    [local_report] = json.loads(out)
    assert remote_report["total_tokens"] == local_report["total_tokens"] and remote_report["steps"] == 60


def test_server_refusals_are_one_clear_message(remote, capsys, bad_spec, monkeypatch):
    url, store_url = remote
    with JobStore(store_url) as store:
        before = len(store.list())
    code, out, err = run(capsys, "--server", url, "submit", PAST_TENSE, bad_spec, "/nonexistent/spec.yaml")
    assert code == 1 and out == ""
    for line in (
        f"{bad_spec}: 4 problems in the job spec",
        "training.steps: must be >= 1",
        "extra_key: unknown key",
        "/nonexistent/spec.yaml: 1 problem",
        "2 of 3 specs invalid; nothing was submitted",
    ):
        assert line in err, (line, err)
    with JobStore(store_url) as store:
        assert len(store.list()) == before  # all or none, as locally

    for argv in (["cancel", "j-nope"], ["logs", "j-nope"], ["status", "j-nope"]):
        code, out, err = run(capsys, "--server", url, *argv)
        assert (code, out) == (1, "")
        assert err == f"prefixd {argv[0]}: error: no job with id 'j-nope' (`prefixd list` shows the known ones)\n"

    monkeypatch.setenv("PREFIXD_TOKEN", "not-the-token")
    code, out, err = run(capsys, "--server", url, "list")
    assert (code, out) == (1, "")
    assert err.strip() == (
        f"prefixd list: error: {url} refused the token (HTTP 403: token not accepted) "
        "(the token comes from PREFIXD_TOKEN)"
    )
    monkeypatch.delenv("PREFIXD_TOKEN")
    code, _, err = run(capsys, "--server", url, "status")
    assert code == 1 and "needs a bearer token: set PREFIXD_TOKEN" in err

    monkeypatch.setenv("PREFIXD_TOKEN", TOKEN)
    code, _, err = run(capsys, "--server", "http://127.0.0.1:9", "list")  # nothing listens on port 9
    assert code == 1 and "cannot reach the prefixd server at http://127.0.0.1:9" in err
    code, _, err = run(capsys, "--server", "ftp://example", "list")
    assert code == 1 and "expected http://HOST:PORT" in err


def test_server_from_the_environment_and_local_only_commands(remote, capsys, home, monkeypatch):
    url, _ = remote
    monkeypatch.setenv("PREFIXD_SERVER", url)
    code, out, _ = run(capsys, "--home", str(home), "list", "--json")
    assert code == 0 and json.loads(out)  # the server's jobs, not the (empty) local home's
    assert not home.exists()

    code, out, _ = run(capsys, "validate", PAST_TENSE)  # validate and schema stay local
    assert code == 0 and out.startswith(f"{PAST_TENSE}: ok")
    assert run(capsys, "schema")[0] == 0

    for argv in (["run"], ["serve"], ["generate", "--task", "past-tense", "hi"]):
        code, out, err = run(capsys, *argv)
        assert (code, out) == (2, "")
        assert (
            err.startswith(f"prefixd {argv[0]}: error: `prefixd {argv[0]}` works on this machine")
            and "PREFIXD_SERVER" in err
        ), err
    monkeypatch.delenv("PREFIXD_SERVER")
    code, _, err = run(capsys, "--server", url, "run")
    assert code == 2 and "drop --server" in err


def test_server_registry_commands(remote, capsys):
    url, _ = remote
    code, out, _ = run(capsys, "--server", url, "models")  # (stderr: the in-process server's MLflow log)
    assert (code, out) == (0, "no registered prefixd models\n")
    code, out, _ = run(capsys, "--server", url, "models", "--json", "--tag", "example=true")
    assert code == 0 and json.loads(out) == []
    code, out, err = run(capsys, "--server", url, "lookup", "past-tense")
    assert (code, out) == (2, "") and err.startswith("prefixd lookup: error: no registered model for task")
    code, _, err = run(capsys, "--server", url, "lookup", "past-tense", "--download", "x")
    assert code == 1 and "--download and --mlflow-uri work only without --server" in err
    code, _, err = run(capsys, "--server", url, "models", "--tag", "nokey")
    assert code == 2 and "expected KEY=VALUE" in err
    code, _, err = run(capsys, "--server", url, "lookup", "past-tense", "--version", "0")
    assert code == 2 and "expected an integer >= 1" in err


def test_registry_commands_print_the_same_locally_and_through_the_server(api, remote, capsys):
    """One definition of lookup and models, two registries: the server's MLflow asked over HTTP, and the same
    MLflow asked from here (--mlflow-uri). A model registered straight into it: every output matches."""
    from mlflow import MlflowClient

    url, _ = remote
    uri = api[1].tracking_uri
    client = MlflowClient(uri, uri)
    client.create_registered_model("prefixd-echo", tags={"prefixd.task": "echo", "prefixd.owner": "local"})
    tags = {"prefixd.task": "echo", "prefixd.job_id": "j-1", "prefixd.base_model": "builtin:smollm2-135m:float32"}
    client.create_model_version("prefixd-echo", "file:///nowhere", tags=tags | {"prefixd.metric.eval_loss": "1.5"})
    client.set_registered_model_alias("prefixd-echo", "champion", "1")
    for argv, code in (
        (["models"], 0),
        (["models", "--json", "--base", "builtin:smollm2-135m"], 0),
        (["lookup", "echo"], 0),
        (["lookup", "prefixd-echo", "--version", "1", "--json"], 0),
        (["lookup", "echo", "--alias", "gone"], 2),
        (["lookup", "nope"], 2),
        (["models", "--tag", "nokey"], 2),
    ):
        here = run(capsys, *argv, "--mlflow-uri", uri)
        there = run(capsys, "--server", url, *argv)
        assert here[:2] == there[:2] and here[0] == code, (argv, here, there)
        if code:  # the same error line last (MLflow may log above it)
            assert here[2].splitlines()[-1] == there[2].splitlines()[-1], argv
    assert "prefixd-echo v1 (champion, latest)" in run(capsys, "lookup", "echo", "--mlflow-uri", uri)[1]


def test_serve_api_refuses_without_tokens(home, monkeypatch):
    monkeypatch.delenv("PREFIXD_API_TOKENS", raising=False)
    config = config_from_args(argparse.Namespace(home=str(home)))
    args = build_parser().parse_args(["serve", "--api", "--port", "0"])
    with pytest.raises(CommandError, match="set PREFIXD_API_TOKENS"):
        serving._start_api(config, args)


def test_status_tells_why_a_succeeded_job_is_not_registered(home, capsys):
    code, out, _ = run(capsys, "--home", str(home), "submit", REVERSE)
    [job_id] = [line.split("\t")[0] for line in out.splitlines()]
    with JobStore(f"sqlite:///{home / 'jobs.db'}") as store:
        store.claim("test")
        store.finish(job_id, "succeeded")
        assert "registered:  not yet (the orchestrator" in run(capsys, "--home", str(home), "status", job_id)[1]
        store.mark_registration_failed(job_id, "MLflow unreachable: connection refused", time.time() + 60)
        store.mark_registration_failed(job_id, "MLflow unreachable: connection refused", time.time() + 120)
        out = run(capsys, "--home", str(home), "status", job_id)[1]
        assert "registered:  not yet: 2 attempt(s) failed (MLflow unreachable: connection refused); next try" in out
        store.mark_registered(job_id, "prefixd-reverse-words", "3")
    assert "registered:  prefixd-reverse-words v3" in run(capsys, "--home", str(home), "status", job_id)[1]


def test_status_shows_the_mlflow_run_and_the_estimated_finish(home, capsys):
    code, out, _ = run(capsys, "--home", str(home), "submit", REVERSE)
    [job_id] = [line.split("\t")[0] for line in out.splitlines()]
    out = run(capsys, "--home", str(home), "status", job_id)[1]
    assert "mlflow run:" not in out and "est. finish:" not in out
    with JobStore(f"sqlite:///{home / 'jobs.db'}") as store:
        store.claim("test")
        store.update_progress(job_id, step=10, total_steps=60, loss=1.0, tokens_per_s=100.0, examples_per_s=4.0)
        store.set_run_id(job_id, "0123abcd")
        job = store.get(job_id)
    assert job.estimated_finish is not None and job.estimated_finish > job.updated_at
    out = run(capsys, "--home", str(home), "status", job_id)[1]
    assert "mlflow run:  0123abcd" in out.splitlines()
    assert f"est. finish: {clock(job.estimated_finish)}" in out.splitlines()
