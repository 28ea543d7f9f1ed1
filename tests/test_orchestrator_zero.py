"""The orchestrator with two-rank ZeRO-3 worker groups (gloo on CPU): jobs train, and a rank killed
mid-run brings the group back, resumed from checkpoints, to the uninterrupted result."""

import os
import signal
import threading
from pathlib import Path

import pytest
import ray

from orchestrator.config import OrchestratorConfig
from orchestrator.local_ray import start_local_ray
from orchestrator.scheduler import Orchestrator
from orchestrator.store import JobStore
from tests.test_orchestrator import events, prefix_of, prefix_trained_alone, submit, tiny_base, wait_for, write_spec  # noqa: F401

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_two():
    start_local_ray(num_cpus=2)
    yield
    ray.shutdown()


def test_two_rank_group_survives_a_killed_rank(ray_two, tiny_base, tmp_path):
    home, specs = tmp_path / "home", tmp_path / "specs"
    config = OrchestratorConfig.from_env(
        home=home,
        workers_per_group=2,
        zero_stage=3,
        zero_persistence_threshold=0,
        cpus_per_group=1,
        max_groups=1,
        poll_s=0.2,
        heartbeat_s=0.5,
        stale_after_s=5,
        idle_timeout_s=600,
        register=False,
    )
    orchestrator = Orchestrator(config)
    store = JobStore(config.store_url)
    stop = threading.Event()
    thread = threading.Thread(target=orchestrator.serve, args=(stop,), daemon=True)
    thread.start()
    try:
        ids = submit(
            home,
            write_spec(specs, "z-rev", "reverse", tiny_base, steps=40, checkpoint_every=5),
            write_spec(specs, "z-nxt", "next", tiny_base, steps=40, checkpoint_every=5),
        )
        wait_for(lambda: (store.get(ids[0]).step or 0) >= 12, 240, "12 steps")
        [group] = orchestrator.groups.values()
        assert len(group.followers) == 1
        os.kill(ray.get(group.followers[0].pid.remote()), signal.SIGKILL)  # rank 1 dies mid-training

        for job_id in ids:
            job = wait_for(
                lambda: (j := store.get(job_id)).state in ("succeeded", "failed") and j, 300, f"{job_id} to end"
            )
            assert job.state == "succeeded", job.error
            assert job.attempts == 2, events(store, job_id)
            assert any(m.startswith("resumed from the checkpoint at step") for m in events(store, job_id))
        assert orchestrator.groups_started == 2
    finally:
        stop.set()
        thread.join(60)
        orchestrator.close()

    for job_id in ids:
        job = store.get(job_id)
        diff = (prefix_of(Path(job.result_dir) / "prefix") - prefix_trained_alone(job, tmp_path)).abs().max().item()
        assert diff < 1e-5, (job.task, diff)
    store.close()
