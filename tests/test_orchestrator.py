"""The orchestrator on a real local Ray (127.0.0.1, 2 CPUs) with a tiny Llama saved as a local model folder.

One Ray for the module. `served` is one orchestrator serving in a thread for several tests: its single
worker group (one base model) stays up between them, which is itself the point of a resident model.
`prefixd run` is also run as a real subprocess (its own private Ray) and killed with SIGKILL.
"""

import contextlib
import io
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from jobs.spec import JobSpec
from orchestrator import scheduler
from orchestrator.cli import main
from orchestrator.config import OrchestratorConfig, machine_local_uri, mlflow_database_uri
from orchestrator.errors import first_line
from orchestrator.local_ray import start_local_ray
from orchestrator.plan import base_model_ref, task_config
from orchestrator.progress import ProgressView
from orchestrator.scheduler import Orchestrator
from orchestrator.store import JobStore
from tests.tiny import save_tiny_base, write_task
from workers.formats import load_prefix
from workers.models import load_base_model
from workers.trainer import MultiTaskTrainer

pytestmark = pytest.mark.slow  # starts Ray

ROOT = Path(__file__).resolve().parent.parent
KINDS = ("reverse", "double", "next")


# ---- fixtures and helpers -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_local():
    start_local_ray(num_cpus=2)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny Llama and its tokenizer saved as a model folder (safetensors), usable as base_model.path."""
    folder = tmp_path_factory.mktemp("models") / "tiny-llama"
    save_tiny_base(folder)
    return folder


def write_spec(folder: Path, name: str, kind: str, base: Path, **training) -> Path:
    """A job spec (and its data) for a tiny task on `base`."""
    folder.mkdir(parents=True, exist_ok=True)
    data = write_task(folder / f"{name}.jsonl", kind, seed=len(name))
    training = dict(steps=10, examples_per_step=4, eval_every=5, checkpoint_every=5, learning_rate=0.02) | training
    spec = {
        "name": name,
        "base_model": {"path": str(base)},
        "data": {"train": Path(data).name, "input_column": "input", "target_column": "target", "max_length": 40},
        "prefix": {"num_virtual_tokens": 5},
        "training": training,
    }
    path = folder / f"{name}.yaml"
    path.write_text(json.dumps(spec), encoding="utf-8")  # JSON is YAML
    return path


def submit(home: Path, *specs: Path) -> list[str]:
    """`prefixd submit --json` in-process; returns the job ids."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--home", str(home), "submit", "--json", *map(str, specs)]) == 0
    return [j["id"] for j in json.loads(buf.getvalue())]


def wait_for(predicate, timeout: float, what: str, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def prefix_of(folder) -> torch.Tensor:
    return load_prefix(folder)[1].prompt_embeddings().detach()


def prefix_trained_alone(job, tmp_path: Path) -> torch.Tensor:
    """The prefix the job's spec gets trained by itself, in this process, without interruption."""
    spec = JobSpec.from_dict(job.spec)
    model, tokenizer = load_base_model(base_model_ref(spec))
    trainer = MultiTaskTrainer(model, tokenizer, data_cache_dir=str(tmp_path / "cache"))
    trainer.add_task(task_config(spec, job.id, tmp_path / "alone" / job.id))
    results = []
    while trainer.active:
        results += trainer.step().finished
    return prefix_of(results[0].prefix_dir)


def run_command(home: Path) -> list[str]:
    """`prefixd run` as a subprocess's argv: its own local Ray of 2 CPUs, quick polls and heartbeats."""
    flags = ["--num-cpus", "2", "--poll", "0.2", "--heartbeat", "0.5", "--stale-after", "3"]
    return [sys.executable, "-m", "orchestrator.cli", "--home", str(home), "run", *flags]


def events(store: JobStore, job_id: str) -> list[str]:
    return [message for _, _, message in store.logs(job_id)]


def test_config_model_cache_default_matches_workers(monkeypatch):
    from orchestrator.config import default_model_cache
    from workers.models import default_model_cache as workers_default

    monkeypatch.delenv("PREFIXD_MODEL_CACHE", raising=False)
    assert default_model_cache() == workers_default()
    monkeypatch.setenv("PREFIXD_MODEL_CACHE", "/tmp/x")
    assert default_model_cache() == workers_default() == Path("/tmp/x")


def test_tracking_uri_kinds_and_one_line_errors():
    local = ["sqlite:////srv/mlflow.db", "file:///srv/mlruns", "/srv/mlruns", "./mlruns", "~/mlruns"]
    remote = ["http://127.0.0.1:5000", "https://mlflow.example", "postgresql://u@db/mlflow", "databricks"]
    assert [machine_local_uri(u) for u in local + remote] == [True] * len(local) + [False] * len(remote)
    databases = ["sqlite:////srv/mlflow.db", "postgresql://u@db/mlflow", "postgresql+psycopg2://u@db/m"]
    others = ["http://127.0.0.1:5000", "file:///srv/mlruns", "/srv/mlruns", "databricks"]
    assert [mlflow_database_uri(u) for u in databases + others] == [True] * 3 + [False] * 4
    assert first_line(OSError()) == "OSError"
    assert first_line(ValueError("\n  \nbad value\nmore")) == "bad value"


def test_config_reports_every_bad_setting(tmp_path):
    with pytest.raises(ValueError) as e:
        OrchestratorConfig.from_env(home=tmp_path, max_groups=0, poll_s=-1)
    assert "max_groups" in str(e.value) and "poll_s" in str(e.value)
    with pytest.raises(ValueError, match="stale_after_s"):
        OrchestratorConfig.from_env(home=tmp_path, heartbeat_s=5, stale_after_s=6)
    c = OrchestratorConfig.from_env(home=tmp_path)
    assert c.store_url == f"sqlite:///{tmp_path.resolve() / 'jobs.db'}"
    assert c.job_dir("j-1") == tmp_path.resolve() / "jobs" / "j-1"


def test_group_settings_from_the_command_line_and_their_checks(tmp_path):
    from orchestrator.cli import build_parser
    from orchestrator.commands.serving import scheduler_settings

    args = build_parser().parse_args(["run", "--zero-stage", "0", "--compile-layers"])
    config = OrchestratorConfig.from_env(home=tmp_path, **scheduler_settings(args))
    assert (config.zero_stage, config.compile_layers) == (0, True)
    args = build_parser().parse_args(["run", "--workers-per-group", "2", "--zero-offload", "--gpus-per-worker", "1"])
    config = OrchestratorConfig.from_env(home=tmp_path, **scheduler_settings(args))
    assert (config.workers_per_group, config.zero_offload, config.gpus_per_worker, config.zero_stage) == (
        2,
        True,
        1.0,
        3,
    )
    assert (
        OrchestratorConfig.from_env(
            home=tmp_path, **scheduler_settings(build_parser().parse_args(["run"]))
        ).compile_layers
        is False
    )
    with pytest.raises(ValueError, match="compile_layers: needs zero_stage 0 or 2"):
        OrchestratorConfig.from_env(home=tmp_path, compile_layers=True)  # the default stage is 3
    with pytest.raises(ValueError, match="compile_layers: must be true or false, got 'yes'"):
        OrchestratorConfig.from_env(home=tmp_path, zero_stage=0, compile_layers="yes")


def test_progress_view_plain_and_terminal():
    from orchestrator.store import Job

    def job(**kw):
        base = dict(
            id="j-1",
            task="rev",
            base_key="b",
            priority=0,
            state="running",
            spec={},
            attempts=1,
            max_attempts=3,
            created_at=0.0,
            started_at=0.0,
            finished_at=None,
            updated_at=0.0,
            error=None,
            step=10,
            total_steps=110,
            loss=1.5,
            tokens_per_s=1234.0,
            examples_per_s=5.0,
            result_dir=None,
            cancel_requested=False,
            owner="o",
            heartbeat_at=0.0,
            registered=False,
            registry_model=None,
            registry_version=None,
            registration_attempts=0,
            registration_error=None,
            next_registration_at=None,
        )
        return Job(**(base | kw))

    now = [100.0]
    out = io.StringIO()
    view = ProgressView(out, tty=False, every_s=5, clock=lambda: now[0])
    view([job()])
    now[0] += 2
    view([job(step=20)])  # within every_s: no line
    now[0] += 8
    view([job(step=30)])  # 20 steps in 10 s -> 80 steps left = 40 s
    view([job(state="succeeded", step=110, result_dir="/r")])
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    assert "step 10/110" in lines[0] and "loss 1.5000" in lines[0] and "1,234 tok/s" in lines[0]
    assert "step 30/110" in lines[1] and "ETA 40s" in lines[1]
    assert "succeeded" in lines[2] and "-> /r" in lines[2] and "ETA" not in lines[2]

    term = io.StringIO()
    view = ProgressView(term, tty=True)
    view([job(), job(id="j-2", state="queued", step=None, total_steps=None, loss=None)])
    view([job(step=11), job(id="j-2")])
    assert term.getvalue().count("\x1b[2F\x1b[J") == 1  # redrawn in place


# ---- batch mode in-process ----------------------------------------------------------------------------


def test_end_to_end_run(ray_local, tiny_base, tmp_path, capsys, monkeypatch):
    home = tmp_path / "home"
    specs = [write_spec(tmp_path / "specs", f"e2e-{k}", k, tiny_base) for k in KINDS]
    ids = submit(home, *specs)
    capsys.readouterr()
    tables_at_group_start = []  # the embedded MLflow database is set up before any group may open it
    start_group = scheduler.start_group

    def observed_start_group(*args, **kwargs):
        with sqlite3.connect(home / "mlflow" / "mlflow.db") as db:
            tables_at_group_start.append({row[0] for row in db.execute("SELECT name FROM sqlite_master")})
        return start_group(*args, **kwargs)

    monkeypatch.setattr(scheduler, "start_group", observed_start_group)

    code = main(["--home", str(home), "run", "--poll", "0.2", "--heartbeat", "0.5", "--stale-after", "5"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "done: 3 succeeded" in out
    assert all(i in out for i in ids) and "step 10/10" in out  # the plain progress lines

    with JobStore(f"sqlite:///{home / 'jobs.db'}") as store:
        for job_id in ids:
            job = store.get(job_id)
            assert (job.state, job.step, job.total_steps, job.attempts, job.error) == ("succeeded", 10, 10, 1, None)
            assert job.loss is not None and job.tokens_per_s > 0
            result_dir = Path(job.result_dir)
            assert result_dir == home / "jobs" / job_id
            assert (result_dir / "adapter" / "adapter_config.json").is_file()
            result = json.loads((result_dir / "result.json").read_text())
            assert result["job_id"] == job_id and result["steps"] == 10 and "eval_loss" in result["metrics"]
            assert not (result_dir / "checkpoints").exists()
            log = events(store, job_id)
            assert any("started at step 0 of 10" in m for m in log)
            assert sum("succeeded" in m for m in log) == 1
            metrics, _ = store.events(job_id, types=("metrics",))  # at the start, each step; evaluations at 5, 10
            assert [e.data["step"] for e in metrics] == list(range(0, 11))
            assert [e.data["step"] for e in metrics if "eval_loss" in e.data.get("eval", {})] == [5, 10]
            assert metrics[-1].data["loss"] == job.loss and metrics[-1].data["tokens_per_s"] == job.tokens_per_s
    assert (home / "logs" / "orchestrator.log").is_file()
    assert tables_at_group_start and all(
        {"alembic_version", "experiments", "runs", "registered_models", "model_versions"} <= tables
        for tables in tables_at_group_start
    )


def test_run_with_compiled_layers(ray_local, tiny_base, tmp_path, capsys):
    """`--zero-stage 0 --compile-layers`: the group trains with compiled decoder layers and says so."""
    home = tmp_path / "home"
    [job_id] = submit(home, write_spec(tmp_path / "specs", "compiled", "reverse", tiny_base, steps=6))
    code = main(
        [
            "--home",
            str(home),
            "run",
            "--poll",
            "0.2",
            "--heartbeat",
            "0.5",
            "--stale-after",
            "5",
            "--zero-stage",
            "0",
            "--compile-layers",
        ]
    )
    assert code == 0, capsys.readouterr().out
    with JobStore(f"sqlite:///{home / 'jobs.db'}") as store:
        assert store.get(job_id).state == "succeeded"
        assert any("started at step 0 of 6" in m and m.endswith("; compiled layers") for m in events(store, job_id))


# ---- `prefixd run` killed and started again ---------------------------------------------------------------


def test_killed_run_resumes_every_job_exactly_once(tiny_base, tmp_path):
    home = tmp_path / "home"
    specs = [
        write_spec(tmp_path / "specs", "short", "reverse", tiny_base, steps=8),
        write_spec(tmp_path / "specs", "long-a", "double", tiny_base, steps=60),
        write_spec(tmp_path / "specs", "long-b", "next", tiny_base, steps=60),
    ]
    short, long_a, long_b = submit(home, *specs)
    command = run_command(home)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFIXD_STORE_URL")}
    store = JobStore(f"sqlite:///{home / 'jobs.db'}")

    def start(log_name):
        log = open(tmp_path / log_name, "w")
        # A session of its own: the kill below reaches everything this `prefixd run` started.
        return subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )

    first = start("run1.log")
    try:

        def mid_batch():
            jobs = {j.id: j for j in store.list()}
            return jobs[short].state == "succeeded" and all(
                (jobs[i].step or 0) >= 6 and jobs[i].state == "running" for i in (long_a, long_b)
            )

        wait_for(mid_batch, 150, "the short job done and the long ones past a checkpoint")
    finally:
        # SIGKILL the run and, at once, its Ray: its worker would otherwise train on for the few seconds
        # Ray takes to notice that the driver died.
        _kill_session(first)
    at_kill = {j.id: j for j in store.list()}
    assert [at_kill[i].state for i in (short, long_a, long_b)] == ["succeeded", "running", "running"]
    assert all(at_kill[i].step < 60 for i in (long_a, long_b))
    time.sleep(2)  # nothing of the killed run may train on (a survivor would finish the jobs itself)
    after = {j.id: (j.state, j.step) for j in store.list()}
    assert after == {i: (j.state, j.step) for i, j in at_kill.items()}, "a process of the killed run lived on"

    second = start("run2.log")
    try:
        code = second.wait(240)
    finally:
        _kill_session(second)
    output = (tmp_path / "run2.log").read_text()
    assert code == 0, output
    assert "done: 2 succeeded" in output  # the short job was not run again

    jobs = {j.id: j for j in store.list()}
    assert set(jobs) == {short, long_a, long_b}  # nothing lost, nothing added
    assert all(j.state == "succeeded" for j in jobs.values())
    assert jobs[short].attempts == 1 and jobs[long_a].attempts == jobs[long_b].attempts == 2
    for job_id, job in jobs.items():
        log = events(store, job_id)
        assert sum(m.startswith("succeeded") for m in log) == 1, log
        assert (Path(job.result_dir) / "adapter").is_dir()
    for job_id in (long_a, long_b):
        log = events(store, job_id)
        assert any("stopped sending heartbeats" in m for m in log), log
        resumed = [m for m in log if m.startswith("resumed from the checkpoint at step")]
        assert len(resumed) == 1, log
        assert int(resumed[0].split("step ")[1].split(" ")[0]) >= 5  # not from scratch
        assert json.loads((home / "jobs" / job_id / "result.json").read_text())["steps"] == 60
    store.close()


def test_sigterm_hands_jobs_back_without_an_attempt_and_they_resume_exactly(tiny_base, tmp_path):
    """SIGTERM to `prefixd run` mid-training: each job is checkpointed at the step boundary and queued again
    with its attempt not charged; the next run resumes both from there to the uninterrupted results."""
    home = tmp_path / "home"
    ids = submit(
        home,
        write_spec(tmp_path / "specs", "term-a", "double", tiny_base, steps=30, checkpoint_every=50),
        write_spec(tmp_path / "specs", "term-b", "next", tiny_base, steps=30, checkpoint_every=50),
    )
    command = run_command(home)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "PREFIXD_STORE_URL")}
    store = JobStore(f"sqlite:///{home / 'jobs.db'}")
    with open(tmp_path / "run1.log", "w") as log:
        first = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        wait_for(
            lambda: all((j.step or 0) >= 4 and j.state == "running" for j in store.list()), 150, "both jobs training"
        )
        first.send_signal(signal.SIGTERM)
        code = first.wait(120)
    finally:
        _kill_session(first)
    output = (tmp_path / "run1.log").read_text()
    assert code == 143, output
    assert "queued again from their checkpoints, no attempt charged" in output, output
    stopped = {j.id: j for j in store.list()}
    for job_id in ids:
        assert (stopped[job_id].state, stopped[job_id].attempts) == ("queued", 0), events(store, job_id)
        assert any("no attempt charged" in m and "checkpointed at step" in m for m in events(store, job_id))

    with open(tmp_path / "run2.log", "w") as log:
        second = subprocess.Popen(
            command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        code = second.wait(240)
    finally:
        _kill_session(second)
    assert code == 0, (tmp_path / "run2.log").read_text()
    for job_id in ids:
        job = store.get(job_id)
        assert (job.state, job.attempts) == ("succeeded", 1), job.error
        resumed = [m for m in events(store, job_id) if m.startswith("resumed from the checkpoint at step")]
        assert resumed and int(resumed[0].split("step ")[1].split(" ")[0]) >= 4, events(store, job_id)
        diff = (prefix_of(Path(job.result_dir) / "prefix") - prefix_trained_alone(job, tmp_path)).abs().max().item()
        assert diff < 1e-5, (job.task, diff)
    store.close()


def _kill_session(process: subprocess.Popen) -> None:
    """SIGKILL the process and everything it started: the processes of the session it leads (it was
    started with start_new_session: its Ray) and all its descendants, found before the kill (once the
    driver dies its children are re-parented and the tree is lost; a process that left the session, as a
    Ray worker may, would otherwise train on for the seconds Ray takes to notice); then reap it."""

    def table() -> dict[int, tuple[int, int]]:  # pid -> (ppid, session)
        out = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()  # after the name: state ppid pgrp session
            out[int(entry.name)] = (int(fields[1]), int(fields[3]))
        return out

    def victims() -> set[int]:
        procs = table()
        found = {pid for pid, (_, session) in procs.items() if session == process.pid}
        frontier = [process.pid]
        while frontier:
            parent = frontier.pop()
            children = [pid for pid, (ppid, _) in procs.items() if ppid == parent and pid not in found]
            found.update(children)
            frontier.extend(children)
        found.discard(process.pid)
        return found

    doomed = victims()
    process.kill()
    for pid in doomed | victims():
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(30)


# ---- one serving orchestrator, one resident group --------------------------------------------------------


class Served:
    """One orchestrator serving in a thread, with one group slot; `settings` add to (or replace) its config."""

    def __init__(self, home: Path, base: Path, specs: Path, **settings):
        self.home, self.base, self.specs = home, base, specs
        fast = dict(cpus_per_group=1, max_groups=1, poll_s=0.2, heartbeat_s=0.5, stale_after_s=5, idle_timeout_s=600)
        self.config = OrchestratorConfig.from_env(home=home, **(fast | settings))
        self.orchestrator = Orchestrator(self.config)
        self.store = JobStore(self.config.store_url)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.orchestrator.serve, args=(self.stop,), daemon=True)
        self.thread.start()

    def submit(self, name, kind, **training) -> str:
        return submit(self.home, write_spec(self.specs, name, kind, self.base, **training))[0]

    def wait_state(self, job_id, states, timeout=120):
        return wait_for(
            lambda: (j := self.store.get(job_id)).state in states and j, timeout, f"job {job_id} to be {states}"
        )

    def wait_step(self, job_id, step, timeout=120):
        return wait_for(lambda: (self.store.get(job_id).step or 0) >= step, timeout, f"job {job_id} at step {step}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)
        self.orchestrator.close()
        self.store.close()


@pytest.fixture(scope="module")
def served(ray_local, tiny_base, tmp_path_factory):
    root = tmp_path_factory.mktemp("served")
    s = Served(root / "home", tiny_base, root / "specs")
    yield s
    s.close()


def test_job_joins_a_training_group_without_reloading(served):
    long = served.submit("join-long", "reverse", steps=100_000, eval_every=100_000, checkpoint_every=100_000)
    served.wait_step(long, 3, timeout=150)  # the group is up and training
    # the group's status is read from the worker and can trail the job's step by a moment
    wait_for(
        lambda: [s["loads"] for s in served.orchestrator.group_statuses().values()] == [1],
        30,
        "the group to report its one model load",
    )
    [status] = served.orchestrator.group_statuses().values()
    assert status["loads"] == 1

    submitted = time.monotonic()
    short = served.submit("join-short", "double")
    served.wait_step(short, 1, timeout=30)
    first_step_s = time.monotonic() - submitted
    assert first_step_s < 15, first_step_s  # joined between two steps of the running group

    assert served.store.get(long).state == "running"  # the long job was not interrupted
    served.wait_state(short, {"succeeded"}, timeout=60)
    [status_after] = served.orchestrator.group_statuses().values()
    assert status_after["pid"] == status["pid"] and status_after["loads"] == 1
    assert served.orchestrator.groups_started == 1 and served.orchestrator.model_loads == 1
    assert any(m.startswith("started at step 0") for m in events(served.store, short))

    served.store.request_cancel(long)
    served.wait_state(long, {"cancelled"}, timeout=30)


def test_cancel_stops_at_the_next_step_and_others_carry_on(served):
    victim = served.submit("cancel-me", "next", steps=100_000, eval_every=100_000, checkpoint_every=100_000)
    other = served.submit("carry-on", "reverse", steps=40)
    served.wait_step(victim, 3)
    # the other job is admitted at a later step boundary; cancel once both train, so it is a co-tenant
    served.wait_step(other, 1)
    step_at_request = served.store.get(victim).step
    served.store.request_cancel(victim)
    cancelled = served.wait_state(victim, {"cancelled"}, timeout=30)
    assert cancelled.step <= step_at_request + 2  # the step in flight, at most
    assert cancelled.result_dir is None
    other_then = served.store.get(other)
    assert other_then.state == "running" and other_then.step < 40
    done = served.wait_state(other, {"succeeded", "failed"}, timeout=60)
    assert (done.state, done.step) == ("succeeded", 40)
    assert any(m.startswith(f"stopped at step {cancelled.step}") for m in events(served.store, victim))


def test_broken_data_fails_after_its_attempts_without_holding_up_others(served):
    good = served.submit("good", "reverse", steps=20)
    broken = served.submit("broken", "double")
    (served.specs / "broken.jsonl").unlink()  # gone after submit: every attempt fails at add_task
    failed = served.wait_state(broken, {"failed", "succeeded"}, timeout=60)
    assert failed.state == "failed"
    assert failed.attempts == failed.max_attempts == 3
    assert "broken.jsonl" in failed.error
    own_lines = [m for m in events(served.store, broken) if m.startswith("worker group ")]
    assert len(own_lines) == 3 and all("cannot start training: DataError" in m for m in own_lines), own_lines
    done = served.wait_state(good, {"succeeded", "failed"}, timeout=60)
    assert done.state == "succeeded" and done.attempts == 1


def test_poisoned_jobs_fail_alone_next_to_a_healthy_one(served, tmp_path):
    """Two poisoned jobs share the group with a healthy one: a job stored with more steps than the bounds
    allow (queued under looser bounds), and one whose loss is NaN from its first step (its job folder holds a
    checkpoint whose prefix is NaN). Each fails with its reason; the healthy job is charged no attempt and
    ends with the prefix it gets trained alone."""
    from orchestrator.store import Quota

    good = served.submit("healthy", "reverse", steps=30, checkpoint_every=10, eval_every=10)
    served.wait_step(good, 1)
    spec = served.store.get(good).spec
    over = served.store.submit(
        spec | {"name": "over", "training": spec["training"] | {"steps": 10**12}}, task="over", base_key=spec_key(spec)
    )
    # The NaN job is held back by its tenant's running-jobs quota until its poisoned checkpoint is in place.
    served.store.set_quotas({"poison": Quota(max_running=1)})
    try:
        holder = served.store.submit(
            spec | {"name": "holder", "training": spec["training"] | {"steps": 100_000}},
            task="holder",
            base_key=spec_key(spec),
            tenant="poison",
        )
        served.wait_step(holder, 1)
        nan = served.store.submit(spec | {"name": "nan"}, task="nan", base_key=spec_key(spec), tenant="poison")
        folder = served.config.jobs_dir / nan
        model, tokenizer = load_base_model(base_model_ref(JobSpec.from_dict(spec)))
        writer = MultiTaskTrainer(model, tokenizer, data_cache_dir=str(tmp_path / "cache"))
        writer.add_task(task_config(JobSpec.from_dict(spec | {"name": "nan"}), nan, folder))
        with torch.no_grad():
            for p in writer.tasks[nan].encoder.parameters():
                p.fill_(float("nan"))
        writer.checkpoint(nan)
        assert served.store.get(nan).state == "queued"
        served.store.request_cancel(holder)
        served.wait_state(holder, {"cancelled"})
    finally:
        served.store.set_quotas({})

    failed_over = served.wait_state(over, {"failed", "succeeded"})
    assert failed_over.state == "failed" and failed_over.attempts <= 1, failed_over
    assert "training.steps: 1000000000000 is over the bound" in failed_over.error
    failed_nan = served.wait_state(nan, {"failed", "succeeded"})
    assert failed_nan.state == "failed" and failed_nan.attempts == 1, failed_nan
    assert "not finite" in failed_nan.error
    done = served.wait_state(good, {"succeeded", "failed"})
    assert (done.state, done.attempts) == ("succeeded", 1), done.error
    diff = (prefix_of(Path(done.result_dir) / "prefix") - prefix_trained_alone(done, tmp_path)).abs().max().item()
    assert diff < 1e-5, diff


def spec_key(spec: dict) -> str:
    """The store's base key of a stored spec, as `prefixd submit` computes it."""
    return JobSpec.from_dict(spec).base_model.base_key


def test_a_sweep_trains_as_co_tenants_and_its_best_variant_becomes_champion(served):
    """A 6-variant sweep: 6 jobs of one group training at once, 6 runs and registered versions of one model,
    and the champion is the variant with the best registry metric (eval_loss, lowest)."""
    from orchestrator import registry

    path = write_spec(served.specs, "sweep6", "reverse", served.base, steps=12, eval_every=6, checkpoint_every=12)
    doc = json.loads(path.read_text())
    grid = {"training.learning_rate": [0.003, 0.01, 0.05], "prefix.num_virtual_tokens": [3, 6]}
    path.write_text(json.dumps(doc | {"sweep": {"parameters": grid}}))
    ids = submit(served.home, path)
    assert len(ids) == 6 and len({served.store.get(i).sweep_id for i in ids}) == 1
    jobs = [served.wait_state(i, {"succeeded", "failed"}, timeout=240) for i in ids]
    assert [j.state for j in jobs] == ["succeeded"] * 6, [j.error for j in jobs]
    assert len({j.owner for j in jobs}) == 1  # one group trained them all
    assert max(j.started_at for j in jobs) < min(j.finished_at for j in jobs)  # all at once, as co-tenants
    jobs = wait_for(
        lambda: all(served.store.get(i).registered for i in ids) and [served.store.get(i) for i in ids],
        120,
        "the sweep's six registrations",
    )
    assert {j.registry_model for j in jobs} == {"prefixd-sweep6"} and len({j.registry_version for j in jobs}) == 6
    eval_loss = {j.id: json.loads((Path(j.result_dir) / "metrics.json").read_text())["eval_loss"] for j in jobs}
    best = min(jobs, key=lambda j: eval_loss[j.id])
    champion = registry.lookup(served.config.tracking_uri, "sweep6")
    assert (champion["version"], champion["job_id"]) == (best.registry_version, best.id)
    runs = {registry.lookup(served.config.tracking_uri, "sweep6", version=j.registry_version)["run_id"] for j in jobs}
    assert len(runs) == 6


def test_killed_worker_comes_back_and_resumes_to_the_same_result(served, tmp_path):
    victim = served.submit("kill-a", "next", steps=60, checkpoint_every=5, eval_every=20)
    other = served.submit("kill-b", "reverse", steps=60, checkpoint_every=5, eval_every=20)
    # Both jobs in the group and past a checkpoint before the kill: the second one is admitted at a later
    # step boundary, and on a fast machine the first can be at step 12 before the second has joined.
    served.wait_step(victim, 12)
    served.wait_step(other, 12)
    assert served.store.get(victim).state == "running", "the first job ended before the second reached step 12"
    [status] = served.orchestrator.group_statuses().values()
    os.kill(status["pid"], signal.SIGKILL)  # the worker process dies mid-training

    for job_id in (victim, other):
        job = served.wait_state(job_id, {"succeeded", "failed"}, timeout=180)
        assert job.state == "succeeded", job.error
        assert job.attempts == 2
        log = events(served.store, job_id)
        assert any("its worker group died" in m for m in log), log
        resumed = [m for m in log if m.startswith("resumed from the checkpoint at step")]
        assert len(resumed) == 1 and int(resumed[0].split("step ")[1].split(" ")[0]) >= 10, log
    assert served.orchestrator.group_failures >= 1 and served.orchestrator.groups_started == 2
    [status_after] = served.orchestrator.group_statuses().values()
    assert status_after["pid"] != status["pid"]

    # The uninterrupted result: the same task trained alone, in this process, start to end.
    for job_id in (victim, other):
        job = served.store.get(job_id)
        spec = JobSpec.from_dict(job.spec)
        model, tokenizer = load_base_model(base_model_ref(spec))
        trainer = MultiTaskTrainer(model, tokenizer, data_cache_dir=str(tmp_path / "cache"))
        trainer.add_task(task_config(spec, job_id, tmp_path / job_id))
        results = []
        while trainer.active:
            results += trainer.step().finished
        diff = (prefix_of(Path(job.result_dir) / "prefix") - prefix_of(results[0].prefix_dir)).abs().max().item()
        assert diff < 1e-5, (job.task, diff)


def test_idle_group_is_released(served):
    [status] = served.orchestrator.group_statuses().values()
    assert status["held"] == [] and status["idle_s"] > 0
    served.orchestrator.config = served.config.with_(idle_timeout_s=0.5)
    wait_for(lambda: not served.orchestrator.groups, 30, "the idle group to be released")
    wait_for(lambda: not _alive(status["pid"]), 30, "its worker process to exit")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
