"""What a worker group makes of a step's report, in the job store: each job's warnings, failures and
progress land as events of that job, with their level (warning, error) and type (message, metrics).
The group's real `_record` on a real sqlite store; the report is built as the trainer builds one.

Run: python -m pytest -q tests/test_group_events.py
"""

from orchestrator.group import WorkerGroup
from orchestrator.group_settings import GroupSettings
from orchestrator.patient_store import PatientStore
from orchestrator.store import JobStore
from workers.trainer import StepReport, TaskProgress


def test_a_step_report_lands_as_events_of_its_jobs(tmp_path):
    url = f"sqlite:///{tmp_path / 'jobs.db'}"
    with JobStore(url) as store:
        ok, bad = (store.submit({}, task=t, base_key="b") for t in ("ok", "bad"))
        assert len(store.claim("g-1", limit=2)) == 2
        group = WorkerGroup(
            GroupSettings(
                base_key="b",
                owner="g-1",
                store_url=url,
                jobs_dir=str(tmp_path / "jobs"),
                data_cache=str(tmp_path / "data"),
                model_cache=str(tmp_path / "models"),
                capacity=2,
                micro_batch_size=1,
                heartbeat_s=1.0,
                poll_s=1.0,
            )
        )
        group.store = PatientStore(store, patience_s=1.0)
        progress = TaskProgress(
            task_id=ok,
            step=3,
            total_steps=10,
            loss=0.5,
            learning_rate=0.1,
            tokens=50,
            tokens_per_s=100.0,
            examples_per_s=2.0,
            eval={"eval_loss": 0.25},
        )
        group._record(
            StepReport(
                step_time_s=0.5,
                tokens=50,
                examples=4,
                progress={ok: progress},
                finished=[],
                warnings={ok: "checkpoint at step 3 not written: disk full"},
                failed={bad: "its training loss is nan at step 3"},
            )
        )
        [*_, warning, evaluation, metrics] = store.events(ok)[0]
        assert (warning.type, warning.level, warning.message) == (
            "message",
            "warning",
            "checkpoint at step 3 not written: disk full",
        )
        assert (evaluation.level, evaluation.message) == ("info", "step 3: eval_loss 0.25")
        assert (metrics.type, metrics.data) == (
            "metrics",
            dict(step=3, total_steps=10, loss=0.5, tokens_per_s=100.0, examples_per_s=2.0, eval={"eval_loss": 0.25}),
        )
        [*_, said, ended] = store.events(bad)[0]
        assert [(e.type, e.level) for e in (said, ended)] == [("message", "error")] * 2
        assert said.message == "failed in worker group g-1, which trains on: its training loss is nan at step 3"
        assert store.get(bad).state == "failed" and store.get(ok).step == 3
