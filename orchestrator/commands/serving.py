"""The commands that train on this machine's Ray: `prefixd run` (until the queue is empty) and `prefixd
serve` (until stopped, optionally with the HTTP API), and the scheduler flags they share.

    prefixd run --max-groups 2 --micro-batch-size 8
    prefixd serve --api --host 0.0.0.0 --port 8000
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from sqlalchemy.engine import make_url

from orchestrator.commands.common import CommandError, config_from_args, open_store, reachable_storage
from orchestrator.config import OrchestratorConfig, read_group_shapes
from orchestrator.store import FINAL_STATES


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.progress import ProgressView
    from orchestrator.scheduler import Orchestrator, Unschedulable

    config = reachable_storage(config_from_args(args, **scheduler_settings(args)))
    store = open_store(args)
    try:
        queued, running = store.queued_base_keys(), store.list(state="running")
    finally:
        store.close()
    if not queued and not running:
        print("nothing to run: no job is queued or running (prefixd submit SPEC queues one)")
        return 0
    view = ProgressView(sys.stdout)
    stop = threading.Event()
    with Orchestrator(config) as orchestrator:
        orchestrator.connect()
        if threading.current_thread() is threading.main_thread():
            # After Ray's start: ray.init installs its own SIGTERM handler (sys.exit(15)).
            signal.signal(signal.SIGTERM, lambda *_: stop.set())
        try:
            summary = orchestrator.run_until_empty(progress_callback=view, stop_event=stop)
        except Unschedulable as e:
            raise CommandError(str(e)) from None
    if stop.is_set():
        waiting = [j for j in summary.jobs.values() if j.state not in FINAL_STATES]
        print(
            f"stopped: {len(waiting)} job(s) queued again from their checkpoints, no attempt charged; "
            "`prefixd run` resumes them",
            file=sys.stderr,
        )
        return 143
    counts = ", ".join(f"{summary.count(s)} {s}" for s in FINAL_STATES if summary.count(s))
    print(f"done: {counts or 'no jobs'}; results under {config.jobs_dir}")
    for job in summary.jobs.values():
        if job.state == "failed":
            print(f"{job.id} ({job.task}) failed: {job.error}", file=sys.stderr)
    return 1 if summary.count("failed") else 0


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    _add_scheduler_arguments(p)


def cmd_serve(args: argparse.Namespace) -> int:
    from orchestrator.scheduler import Orchestrator

    config = reachable_storage(config_from_args(args, **scheduler_settings(args)))
    stop = threading.Event()
    api = _start_api(config, args) if args.api else None
    store_url = make_url(config.store_url).render_as_string(hide_password=True)
    if api is not None:
        print(f"HTTP API on {api.url} (spec paths are read under {api.data_root})", flush=True)
    print(f"prefixd serving jobs from {store_url} (Ctrl-C to stop)", flush=True)
    try:
        with Orchestrator(config) as orchestrator:
            orchestrator.connect()
            if threading.current_thread() is threading.main_thread():
                # After Ray's start: ray.init installs its own SIGTERM handler (sys.exit(15)).
                signal.signal(signal.SIGTERM, lambda *_: stop.set())
            orchestrator.serve(stop)
    except KeyboardInterrupt:
        pass
    finally:
        if api is not None:
            api.stop()
    return 0


def add_serve_arguments(p: argparse.ArgumentParser) -> None:
    _add_scheduler_arguments(p)
    p.add_argument(
        "--api",
        action="store_true",
        help="also serve the HTTP API (orchestrator.api); needs tokens: PREFIXD_API_TOKENS "
        "(comma-separated name=token pairs, one tenant each; a bare token is a tenant of its "
        "own), PREFIXD_ADMIN_TOKENS for admins (they see every job), or their _FILE forms; "
        "PREFIXD_QUOTAS and PREFIXD_SPEC_BOUNDS name the quota and bound files",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="HTTP API address (default 127.0.0.1; another machine can reach it only with an "
        "explicit address such as 0.0.0.0, and then put TLS in front)",
    )
    p.add_argument("--port", type=int, default=8000, help="HTTP API port (default 8000)")
    p.add_argument(
        "--data-root",
        default=None,
        help="folder that relative paths in specs submitted over HTTP are read from, and may not "
        "leave (PREFIXD_DATA_ROOT; default HOME/data)",
    )
    p.add_argument(
        "--serve-models",
        action="store_true",
        help="with --api: also serve every registered prefix, OpenAI-compatible, under /openai/v1 "
        "(prefixd serve-models for its own server and settings)",
    )


def _start_api(config: OrchestratorConfig, args: argparse.Namespace):
    """The HTTP API (orchestrator.api_server, imported only when asked for), with the model-serving routes
    mounted under /openai when --serve-models is given."""
    from orchestrator import api_server
    from orchestrator.serving_cli import serving_catalog

    serving = serving_catalog(config) if getattr(args, "serve_models", False) else None
    try:
        return api_server.start_api(
            config, host=args.host, port=args.port, data_root=getattr(args, "data_root", None), serving=serving
        )
    except api_server.ApiStartError as e:
        raise CommandError(str(e)) from None


_SCHEDULER_FLAGS = (  # flag, config field, type, help
    ("--num-cpus", "num_cpus", int, "CPUs of the local Ray (default: all)"),
    (
        "--cpus-per-group",
        "cpus_per_group",
        float,
        "CPUs each rank of a group reserves, its torch threads on CPU (default: a local Ray's CPUs split across "
        "one group's ranks; 1 on a cluster)",
    ),
    ("--max-groups", "max_groups", int, "most worker groups at once, replicas included (default 2)"),
    (
        "--max-groups-per-base",
        "max_groups_per_base",
        int,
        "most groups serving one base model; another starts when its queue exceeds what they take (default 1)",
    ),
    (
        "--placement-strategy",
        "placement_strategy",
        str,
        "how a group's ranks are placed: PACK (few nodes, default) or STRICT_PACK (one node)",
    ),
    (
        "--group-shapes",
        "group_shapes",
        "file",
        "YAML/JSON table: base model -> group settings (workers_per_group, zero_stage, gpus_per_worker, "
        "cpus_per_group, resources_per_worker, placement_strategy, max_groups)",
    ),
    ("--group-capacity", "group_capacity", int, "most tasks per group (default 8)"),
    ("--micro-batch-size", "micro_batch_size", int, "rows per forward pass (default 16)"),
    (
        "--workers-per-group",
        "workers_per_group",
        int,
        "ranks (processes) per worker group; the base model is partitioned across them with ZeRO-3 (default 1)",
    ),
    ("--gpus-per-worker", "gpus_per_worker", float, "GPUs each rank reserves from Ray (default 0)"),
    ("--zero-offload", "zero_offload", None, "ZeRO-3: keep the base-weight partitions in CPU memory"),
    (
        "--zero-stage",
        "zero_stage",
        int,
        "DeepSpeed ZeRO stage of each group's base model: 3 partitions it across the group's ranks, 0 and 2 keep "
        "a full copy on each (default 3)",
    ),
    (
        "--compile-layers",
        "compile_layers",
        None,
        "run the decoder layers compiled (Llama/Mistral/Qwen2; needs --zero-stage 0 or 2; default off)",
    ),
    ("--idle-timeout", "idle_timeout_s", float, "seconds before an idle group is released (default 30)"),
    (
        "--drain-timeout",
        "drain_timeout_s",
        float,
        "on SIGTERM/Ctrl-C, seconds groups get to checkpoint and hand their jobs back uncharged (default 120)",
    ),
    ("--heartbeat", "heartbeat_s", float, "seconds between heartbeats (default 5)"),
    (
        "--stale-after",
        "stale_after_s",
        float,
        "seconds without heartbeats before a running job is taken back (default 60)",
    ),
    ("--poll", "poll_s", float, "seconds between scheduling passes (default 1)"),
)


def _add_scheduler_arguments(p: argparse.ArgumentParser) -> None:
    for flag, dest, type_, help_text in _SCHEDULER_FLAGS:
        if type_ is None:  # an on/off switch
            p.add_argument(flag, dest=dest, action="store_true", default=None, help=help_text)
        elif type_ == "file":
            p.add_argument(flag, dest=dest, metavar="FILE", default=None, help=help_text)
        else:
            p.add_argument(flag, dest=dest, type=type_, default=None, help=help_text)


def scheduler_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {dest: getattr(args, dest) for _, dest, _, _ in _SCHEDULER_FLAGS if getattr(args, dest) is not None}
    if "group_shapes" in settings:
        try:
            settings["group_shapes"] = read_group_shapes(settings["group_shapes"])
        except ValueError as e:
            raise CommandError(str(e)) from None
    return settings
