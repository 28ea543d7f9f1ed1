"""Gang scheduling and replicas on a simulated Ray cluster (`ray.cluster_utils.Cluster`: several Ray nodes on
this machine, each with its own resources, every address 127.0.0.1).

- A group whose ranks do not all fit reserves nothing, keeps its jobs queued with the reason shown
  (`prefixd status`), and starts once a node with the missing resource joins.
- Two groups of one base model train different jobs at once, each job exactly once.
- The operator's per-base table of group shapes, and its errors.
"""

import contextlib
import io
import threading
import time

import pytest
import ray

from orchestrator.cli import main
from orchestrator.config import GroupShape, OrchestratorConfig
from orchestrator.local_ray import keep_ray_on_loopback
from orchestrator.scheduler import Orchestrator
from orchestrator.store import JobStore
from tests.test_orchestrator import events, submit, tiny_base, wait_for, write_spec  # noqa: F401


@pytest.fixture
def cluster():
    """A Ray head node on 127.0.0.1 offering 4 CPUs and 2 units of the custom resource `slot`."""
    from ray.cluster_utils import Cluster

    keep_ray_on_loopback()
    c = Cluster(
        initialize_head=True,
        head_node_args=dict(num_cpus=4, resources={"slot": 2}, node_ip_address="127.0.0.1", include_dashboard=False),
    )
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")
    yield c
    ray.shutdown()
    c.shutdown()


def serve(config: OrchestratorConfig):
    orchestrator = Orchestrator(config)
    stop = threading.Event()
    thread = threading.Thread(target=orchestrator.serve, args=(stop,), daemon=True)
    thread.start()

    def close():
        stop.set()
        thread.join(60)
        orchestrator.close()

    return orchestrator, close


def status_text(home, job_id: str) -> str:
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["--home", str(home), "status", job_id]) == 0
    return buf.getvalue()


@pytest.mark.slow
def test_group_that_does_not_fit_holds_nothing_until_a_node_joins(cluster, tiny_base, tmp_path):
    home = tmp_path / "home"
    config = OrchestratorConfig.from_env(
        home=home,
        workers_per_group=3,
        zero_stage=0,
        cpus_per_group=1,
        resources_per_worker={"slot": 1},
        max_groups=1,
        poll_s=0.2,
        heartbeat_s=0.5,
        stale_after_s=10,
        idle_timeout_s=600,
        register=False,
    )
    orchestrator, close = serve(config)
    store = JobStore(config.store_url)
    try:
        [job_id] = submit(home, write_spec(tmp_path / "specs", "gang", "reverse", tiny_base, steps=6))
        job = wait_for(lambda: (j := store.get(job_id)).waiting and j, 60, "the job to say what it waits for")
        assert job.state == "queued" and job.attempts == 0
        assert job.waiting.startswith("waiting for 3 slot"), job.waiting
        assert "the cluster has 2 slot" in job.waiting, job.waiting
        assert f"waiting:     {job.waiting}" in status_text(home, job_id)
        time.sleep(2)  # several scheduling passes later: still nothing held, nothing started
        assert ray.available_resources().get("slot") == 2.0
        assert ray.available_resources().get("CPU") == 4.0
        assert orchestrator.groups == {} and len(orchestrator.reservations) == 1
        assert store.get(job_id).state == "queued"

        cluster.add_node(num_cpus=1, resources={"slot": 1}, node_ip_address="127.0.0.1")
        job = wait_for(
            lambda: (j := store.get(job_id)).state in ("succeeded", "failed") and j,
            300,
            "the job to end once the third slot exists",
        )
        assert job.state == "succeeded", job.error
        assert job.attempts == 1 and job.waiting is None
        assert store.waiting() == {}
        [started] = [m for m in events(store, job_id) if m.startswith("started at step 0")]
        assert "worker group" in started
    finally:
        close()
        store.close()
    wait_for(
        lambda: ray.available_resources().get("slot") == 3.0,
        30,  # Ray frees a placement group lazily
        "the group's reservation to be given back",
    )


@pytest.mark.slow
def test_two_groups_of_one_base_train_different_jobs_at_once(cluster, tiny_base, tmp_path):
    home = tmp_path / "home"
    config = OrchestratorConfig.from_env(
        home=home,
        zero_stage=0,
        cpus_per_group=1,
        group_capacity=1,
        max_groups=2,
        max_groups_per_base=2,
        poll_s=0.2,
        heartbeat_s=0.5,
        stale_after_s=10,
        idle_timeout_s=600,
        register=False,
    )
    orchestrator, close = serve(config)
    store = JobStore(config.store_url)
    try:
        ids = submit(
            home,
            *(
                write_spec(tmp_path / "specs", f"rep{i}", kind, tiny_base, steps=25, eval_every=25, checkpoint_every=25)
                for i, kind in enumerate(("reverse", "next"))
            ),
        )
        owners = wait_for(
            lambda: len(o := {j.owner for j in store.list(state="running")}) == 2 and o,
            120,
            "both jobs running in two groups",
        )
        assert len({orchestrator.groups[o].base_key for o in owners}) == 1
        jobs = [
            wait_for(lambda: (j := store.get(i)).state in ("succeeded", "failed") and j, 300, f"{i} to end")
            for i in ids
        ]
    finally:
        close()
        store.close()
    assert [j.state for j in jobs] == ["succeeded"] * 2, [j.error for j in jobs]
    assert [j.attempts for j in jobs] == [1, 1]
    assert {j.owner for j in jobs} == owners  # each trained in its own group
    assert jobs[0].started_at < jobs[1].finished_at and jobs[1].started_at < jobs[0].finished_at  # at once
    for j in jobs:  # exactly once: one start, one finish
        messages = events(JobStore(config.store_url), j.id)
        assert len([m for m in messages if m.startswith("started at step 0")]) == 1, messages
        assert len([m for m in messages if m.startswith("finished at step")]) == 1, messages
    assert orchestrator.groups_started == 2


def test_group_shapes_table_per_base_model(tmp_path):
    shapes = {
        "builtin:big": {
            "workers_per_group": 8,
            "zero_stage": 3,
            "gpus_per_worker": 1,
            "placement_strategy": "STRICT_PACK",
        },
        "builtin:small:bfloat16": {"zero_stage": 0, "gpus_per_worker": 1, "max_groups": 4},
    }
    config = OrchestratorConfig.from_env(home=tmp_path, group_shapes=shapes, cpus_per_group=2)
    big = config.shape_for("builtin:big:float32")  # matched without its dtype
    assert (
        big.workers_per_group,
        big.zero_stage,
        big.gpus_per_worker,
        big.placement_strategy,
        big.max_groups,
        big.cpus_per_group,
    ) == (8, 3, 1, "STRICT_PACK", 1, 2)
    small = config.shape_for("builtin:small:bfloat16")
    assert (small.workers_per_group, small.zero_stage, small.max_groups) == (1, 0, 4)
    assert config.shape_for("builtin:small:float32") == GroupShape(cpus_per_group=2, max_groups=1)  # other dtype


def test_group_shape_errors_name_the_base_and_setting(tmp_path):
    bad = {
        "builtin:x": {
            "workers_per_group": 0,
            "zero_stage": 1,
            "placement_strategy": "SPREAD",
            "resources_per_worker": {"GPU": 1},
        },
        "builtin:y": {"gpus": 1},
    }
    with pytest.raises(ValueError) as e:
        OrchestratorConfig.from_env(home=tmp_path, group_shapes=bad, max_groups_per_base=0)
    text = str(e.value)
    for part in (
        "group_shapes['builtin:x'].workers_per_group: must be an int >= 1, got 0",
        "group_shapes['builtin:x'].zero_stage: must be 0, 2 or 3, got 1",
        "group_shapes['builtin:x'].placement_strategy: must be one of PACK, STRICT_PACK, got 'SPREAD'",
        "group_shapes['builtin:x'].resources_per_worker: CPU and GPU are set by",
        "group_shapes['builtin:y']: unknown settings ['gpus']",
        "max_groups_per_base: must be an int >= 1, got 0",
    ):
        assert part in text, (part, text)


def test_group_shapes_file_from_the_command_line(tmp_path):
    table = tmp_path / "shapes.yaml"
    table.write_text("builtin:smollm2-135m:\n  workers_per_group: 2\n  zero_stage: 3\n  gpus_per_worker: 1\n")
    from orchestrator.cli import build_parser
    from orchestrator.commands.serving import scheduler_settings

    args = build_parser().parse_args(
        [
            "--home",
            str(tmp_path),
            "serve",
            "--group-shapes",
            str(table),
            "--max-groups-per-base",
            "3",
            "--placement-strategy",
            "STRICT_PACK",
        ]
    )
    settings = scheduler_settings(args)
    assert settings["group_shapes"] == {
        "builtin:smollm2-135m": {"workers_per_group": 2, "zero_stage": 3, "gpus_per_worker": 1}
    }
    config = OrchestratorConfig.from_env(home=tmp_path, **settings)
    assert config.shape_for("builtin:smollm2-135m:float32").workers_per_group == 2
    assert config.shape_for("builtin:smollm2-135m:float32").max_groups == 3

    table.write_text("- not a table\n")
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        assert main(["--home", str(tmp_path), "run", "--group-shapes", str(table)]) == 1
    assert "group_shapes:" in buf.getvalue() and "must map base models to settings" in buf.getvalue()


@pytest.mark.slow
def test_batch_run_refuses_a_group_this_machine_cannot_hold(tiny_base, tmp_path, capsys):
    """`prefixd run` on its private local Ray (no node can join): a group asking for a GPU on a CPU-only
    machine is an error naming what is missing, not an endless wait; the job stays queued."""
    home = tmp_path / "home"
    [job_id] = submit(home, write_spec(tmp_path / "specs", "gpu-job", "reverse", tiny_base))
    assert main(["--home", str(home), "run", "--gpus-per-worker", "1", "--num-cpus", "2", "--poll", "0.2"]) == 1
    err = capsys.readouterr().err
    assert "need 1 GPU for one worker group" in err and "this machine's Ray has 0 GPUs" in err, err
    assert "--gpus-per-worker" in err
    store = JobStore(OrchestratorConfig.from_env(home=home).store_url)
    job = store.get(job_id)
    store.close()
    assert job.state == "queued" and job.attempts == 0


@pytest.mark.slow
def test_a_local_group_gets_the_machines_cores(cluster, tiny_base, tmp_path):
    """No --cpus-per-group with a local Ray: the one group reserves every CPU Ray has (4 here) and its rank
    trains with that many torch threads, on the CPU."""
    home = tmp_path / "home"
    config = OrchestratorConfig.from_env(
        home=home,
        zero_stage=0,
        max_groups=1,
        poll_s=0.2,
        heartbeat_s=0.5,
        stale_after_s=10,
        idle_timeout_s=600,
        register=False,
    )
    orchestrator, close = serve(config)
    store = JobStore(config.store_url)
    try:
        [job_id] = submit(home, write_spec(tmp_path / "specs", "cores", "reverse", tiny_base, steps=40))
        status = wait_for(
            lambda: [s for s in orchestrator.group_statuses().values() if s.get("threads")],
            120,
            "the group to report its placement",
        )[0]
        assert (status["device"], status["threads"]) == ("cpu", 4)
        assert ray.available_resources().get("CPU", 0.0) == 0.0  # all four reserved by the group's one rank
        job = wait_for(lambda: (j := store.get(job_id)).state in ("succeeded", "failed") and j, 300, "the job")
        assert job.state == "succeeded", job.error
    finally:
        close()
        store.close()
