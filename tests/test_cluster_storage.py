"""Jobs on a Ray cluster whose nodes share nothing but the storage URI.

`ray.cluster_utils.Cluster` on 127.0.0.1: a head that trains nothing (no `trainer` resource; the
orchestrator runs beside it, in this process, and registers finished jobs), and training nodes, each with a
home folder of its own ($PREFIXD_NODE_HOME: caches and staging only). Two jobs train in one group on one
node; that node is killed mid-job (its raylet and workers SIGKILLed); the jobs resume on another node from
the checkpoints in storage, and their registered prefixes equal an uninterrupted run's. Once against a real
S3-compatible server (moto's, on 127.0.0.1), the jobs' data read from it too; once with a local-path
storage (a folder standing for a shared filesystem). The tiny base model is a local folder every node reads:
base models are not job state.
"""

import json
import os
import signal
from pathlib import Path

import pytest
import ray

from jobs.spec import JobSpec
from orchestrator import registry
from orchestrator.config import OrchestratorConfig
from orchestrator.group_settings import NODE_HOME_ENV
from orchestrator.local_ray import keep_ray_on_loopback
from orchestrator.plan import base_model_ref, task_config
from orchestrator.store import JobStore
from tests.s3 import s3_server
from tests.test_orchestrator import events, submit, tiny_base, wait_for  # noqa: F401
from tests.test_placement import serve
from tests.tiny import write_task
from workers.formats import load_peft_adapter, load_prefix
from workers.models import load_base_model
from workers.storage import JobStorage
from workers.trainer import MultiTaskTrainer

pytestmark = pytest.mark.slow
KINDS = {"c-rev": "reverse", "c-nxt": "next"}


@pytest.fixture(scope="module")
def s3():
    with s3_server() as server:
        yield server


@pytest.fixture(scope="module")
def cluster(s3, tmp_path_factory):
    """The head node; started after the S3 server, so every node inherits its (fake) credentials. Ray is
    told to notice a dead node within a few seconds."""
    from ray.cluster_utils import Cluster

    keep_ray_on_loopback()
    c = Cluster(
        initialize_head=True,
        head_node_args=dict(
            num_cpus=1,
            node_ip_address="127.0.0.1",
            include_dashboard=False,
            _system_config={"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        ),
    )
    ray.init(address=c.address, logging_level="WARNING", log_to_driver=False)
    c.homes = tmp_path_factory.mktemp("node-homes")
    yield c
    ray.shutdown()
    c.shutdown()


def two_trainer_nodes(cluster) -> None:
    """Training nodes until there are two, each with its own home folder."""
    while len(cluster.worker_nodes) < 2:
        home = cluster.homes / f"node-{len(list(cluster.homes.iterdir()))}"
        home.mkdir()
        cluster.add_node(
            num_cpus=1, resources={"trainer": 1}, node_ip_address="127.0.0.1", env_vars={NODE_HOME_ENV: str(home)}
        )


def write_job_spec(folder: Path, name: str, base: Path, train: str) -> Path:
    spec = {
        "name": name,
        "base_model": {"path": str(base)},
        "data": {"train": train, "input_column": "input", "target_column": "target", "max_length": 40},
        "prefix": {"num_virtual_tokens": 5},
        "training": {
            "steps": 60,
            "examples_per_step": 4,
            "eval_every": 30,
            "checkpoint_every": 5,
            "learning_rate": 0.02,
        },
    }
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.yaml").write_text(json.dumps(spec), encoding="utf-8")  # JSON is YAML
    return folder / f"{name}.yaml"


def kill_mid_job_and_resume(cluster, storage_uri: str, base: Path, tmp_path: Path) -> None:
    two_trainer_nodes(cluster)
    storage = JobStorage.open(storage_uri)
    specs = []
    for name, kind in KINDS.items():  # the data lives in the storage too
        storage.write_bytes(
            f"data/{name}.jsonl", Path(write_task(tmp_path / f"{name}.jsonl", kind, seed=len(name))).read_bytes()
        )
        specs.append(write_job_spec(tmp_path / "specs", name, base, storage.child("data", f"{name}.jsonl").uri))
    home = tmp_path / "head-home"
    config = OrchestratorConfig.from_env(
        home=home,
        storage=storage_uri,
        zero_stage=0,
        cpus_per_group=1,
        resources_per_worker={"trainer": 1},
        max_groups=1,
        poll_s=0.2,
        heartbeat_s=0.5,
        stale_after_s=30,
        idle_timeout_s=600,
    )
    ids = submit(home, *specs)
    orchestrator, close = serve(config)
    store = JobStore(config.store_url)
    try:
        wait_for(
            lambda: all((store.get(i).step or 0) >= 11 for i in ids), 240, "both jobs past their step-10 checkpoint"
        )
        # The tracking store is an sqlite file on the head: groups on other nodes open no live runs there.
        assert all(store.get(i).run_id is None for i in ids)
        [before] = orchestrator.group_statuses().values()
        [victim] = [n for n in cluster.worker_nodes if n.node_id == before["node_id"]]
        # The node dies mid-job: its worker first (Ray's workers outlive their raylet by a few seconds, in
        # which a tiny job can finish), then its raylet and the rest.
        os.kill(before["pid"], signal.SIGKILL)
        cluster.remove_node(victim, allow_graceful=False)
        assert all(store.get(i).state == "running" and store.get(i).step < 60 for i in ids)

        def ended(job_id):
            job = store.get(job_id)
            return job if job.state == "failed" or job.registered else None

        try:
            jobs = [wait_for(lambda: ended(i), 300, f"{i} to be registered") for i in ids]
        except AssertionError as e:  # say why: the registrar's last error and each job's events
            why = {i: (store.get(i).registration_error, events(store, i)) for i in ids}
            raise AssertionError(f"{e}: {why}") from None
        [after] = orchestrator.group_statuses().values()
        nodes = {n.node_id: n for n in cluster.worker_nodes}
        assert after["node_id"] in nodes, (after, before, list(nodes), ray.nodes())
        survivor = nodes[after["node_id"]]
    finally:
        close()
        store.close()

    assert after["node_id"] != before["node_id"]  # resumed on the other training node
    for job in jobs:
        log = events(JobStore(config.store_url), job.id)
        assert (job.state, job.attempts) == ("succeeded", 2), log
        resumed = [m for m in log if m.startswith("resumed from the checkpoint")]
        assert len(resumed) == 1 and int(resumed[0].split("step ")[1].split(" ")[0]) >= 10, log
        assert job.result_dir == storage.child("jobs", job.id).uri == str(config.job_dir(job.id))
        folder = JobStorage.open(job.result_dir)
        assert folder.exists("result.json") and folder.complete_checkpoints() == []
    # Both nodes read the data into their own homes, and kept caches and staging only there; the head,
    # which registered the jobs, trained nothing.
    for node in (victim, survivor):
        assert any((Path(node._ray_params.env_vars[NODE_HOME_ENV]) / "cache" / "data").iterdir())
    for node_home in cluster.homes.iterdir():
        assert {p.relative_to(node_home).parts[0] for p in node_home.rglob("*")} <= {"cache"}, node_home
    assert not (home / "jobs").exists() and not (home / "cache" / "scratch").exists()

    for job in jobs:  # the registered prefix is the one the job gets trained without interruption
        spec = JobSpec.from_dict(job.spec)
        adapter = registry.download(config.tracking_uri, spec.name, dst=tmp_path / "registered" / job.id)
        model, tokenizer = load_base_model(base_model_ref(spec))
        _, registered = load_peft_adapter(adapter, model.config)
        trainer = MultiTaskTrainer(model, tokenizer, data_cache_dir=str(tmp_path / "cache"))
        trainer.add_task(task_config(spec, job.id, tmp_path / "alone" / job.id))
        results = []
        while trainer.active:
            results += trainer.step().finished
        alone = load_prefix(results[0].prefix_dir)[1].prompt_embeddings().detach()
        diff = (registered.prompt_embeddings().detach() - alone).abs().max().item()
        assert diff < 1e-5, (job.task, diff)


def test_a_killed_node_resumes_on_another_through_s3(cluster, s3, tiny_base, tmp_path):
    kill_mid_job_and_resume(cluster, s3.uri(f"prefixd/{tmp_path.name}"), tiny_base, tmp_path)


def test_a_killed_node_resumes_on_another_through_a_shared_path(cluster, tiny_base, tmp_path):
    kill_mid_job_and_resume(cluster, str(tmp_path / "shared-storage"), tiny_base, tmp_path)
