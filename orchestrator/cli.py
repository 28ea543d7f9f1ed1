"""The `prefixd` command line: one plain function per command, all listed in COMMANDS.

    prefixd validate jobs/examples/*.yaml        check specs; every problem of every file, exit 1 if any
    prefixd submit jobs/examples/*.yaml          queue them (all or none); prints the job ids
    prefixd run                                  train every queued job, live progress; exit when done
    prefixd serve [--api]                        keep scheduling jobs as they are submitted (and serve HTTP)
    prefixd status [JOB] [--json]                the queue, or one job
    prefixd cancel JOB                           a queued job at once, a running one at its next step
    prefixd logs JOB [-f]                        a job's events (state changes, metrics, errors); -f follows
    prefixd schema                               the job spec's JSON Schema
    prefixd lookup | models | generate           the trained-prefix registry (orchestrator/registry.py)

Global flags (before or after the command): --home (PREFIXD_HOME, default ~/.prefixd), --store-url
(PREFIXD_STORE_URL), --storage (PREFIXD_STORAGE: where job folders live, default --home; a shared path or
s3://bucket/prefix), --ray-address (PREFIXD_RAY_ADDRESS; default: a private local Ray on 127.0.0.1),
--server (PREFIXD_SERVER). User errors print one clear message on stderr and exit 1; usage errors exit 2.
Without --server the commands act on the store directly, as its local admin: they see every tenant's jobs,
and `submit` records tenant 'local'. Specs are checked within the operator's bounds (PREFIXD_SPEC_BOUNDS).

Remote mode. With `--server URL` (a `prefixd serve --api` elsewhere), submit, status, list, cancel, logs,
lookup and models go through its HTTP API (orchestrator/client.py) instead of the local store and
registry, with the same output (text and --json). The bearer token comes from $PREFIXD_TOKEN only, never
a flag (flags show in `ps` and shell history). `submit` first uploads each data file a spec names
(data.train, data.validation) that exists on this machine, relative to the spec file, and sends the spec
with their ids (`file-...`); other paths (a base-model folder, data not found here) are read on the
server, relative to ITS data root (`serve --data-root`). Every spec is checked by the server before any
is queued; a refused spec's uploads are deleted again. validate and schema stay local; run, serve and generate refuse --server.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sqlalchemy.engine import make_url

from jobs.bounds import SpecBounds
from jobs.spec import Problem, SpecError, load_spec, parse_document, spec_json_schema
from jobs.validate import FILE_ID_PATTERN
from orchestrator.client import ApiClient, ApiError
from orchestrator.config import OrchestratorConfig, read_group_shapes
from orchestrator.logs import print_events
from orchestrator.registry_text import parse_tag_filters, print_models, print_version
from orchestrator.store import FINAL_STATES, STATES, InvalidTransition, Job, JobStore, NewJob, UnknownJob
from orchestrator.tenants import LOCAL_TENANT

SERVER_ENV = "PREFIXD_SERVER"
TOKEN_ENV = "PREFIXD_TOKEN"


class CommandError(Exception):
    """A user error: printed as `prefixd <command>: error: <message>`, exit status 1."""


# ---- shared helpers -----------------------------------------------------------------------------------


def config_from_args(args: argparse.Namespace, **settings: Any) -> OrchestratorConfig:
    """The orchestrator config from the global flags (and the environment); for every command, the
    registry's included."""
    try:
        return OrchestratorConfig.from_env(
            home=getattr(args, "home", None),
            store_url=getattr(args, "store_url", None),
            ray_address=getattr(args, "ray_address", None),
            storage=getattr(args, "storage", None),
            **settings,
        )
    except ValueError as e:
        raise CommandError(str(e)) from None


def reachable_storage(config: OrchestratorConfig) -> OrchestratorConfig:
    """The config, once its storage answers (write, read and delete a probe); else CommandError saying
    what failed. For the commands that train or register: every job folder lives there."""
    try:
        config.check_storage()
    except ValueError as e:  # StorageError: the setting, the URI and the fix, never a secret
        raise CommandError(str(e)) from None
    return config


def open_store(args: argparse.Namespace) -> JobStore:
    url = config_from_args(args).store_url
    try:
        return JobStore(url)
    except Exception as e:  # noqa: BLE001 - a bad URL, a missing driver, an unreachable server
        raise CommandError(f"cannot open the job store {url!r}: {e}") from None


def _with_store(args: argparse.Namespace, read: Callable[[JobStore], Any]) -> Any:
    """read(store) on the local job store, closed afterwards."""
    store = open_store(args)
    try:
        return read(store)
    finally:
        store.close()


def server_url(args: argparse.Namespace) -> str | None:
    """--server, else $PREFIXD_SERVER; None: work on the local store and registry."""
    return getattr(args, "server", None) or os.environ.get(SERVER_ENV) or None


def api_client(args: argparse.Namespace) -> ApiClient | None:
    """The client for --server (token from $PREFIXD_TOKEN), or None in local mode."""
    url = server_url(args)
    if url is None:
        return None
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise CommandError(
            f"--server {url} needs a bearer token: set {TOKEN_ENV} (it is never taken from a "
            "flag, which would show in `ps` and shell history)"
        )
    try:
        return ApiClient(url, token)
    except ValueError as e:
        raise CommandError(str(e)) from None


def _load_specs(paths: list[str], args: argparse.Namespace) -> tuple[list[tuple[str, Any]], list[SpecError]]:
    """Each spec file read and checked within the operator's bounds (config.spec_bounds)."""
    bounds = SpecBounds(config_from_args(args).spec_bounds)
    good, bad = [], []
    for path in paths:
        try:
            good.append((path, load_spec(path, bounds=bounds)))
        except SpecError as e:
            bad.append(e)
    return good, bad


def _job_dict(job: Job) -> dict[str, Any]:
    return dataclasses.asdict(job)


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, allow_nan=False))


# ---- commands -------------------------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    good, bad = _load_specs(args.specs, args)
    if args.json:
        _print_json(
            [
                {"spec": p, "valid": True, "name": s.name, "base_key": s.base_model.base_key, "problems": []}
                for p, s in good
            ]
            + [{"spec": e.source, "valid": False, "problems": [str(p) for p in e.problems]} for e in bad]
        )
    else:
        for path, spec in good:
            print(f"{path}: ok ({spec.name}, base {spec.base_model.base_key})")
        for e in bad:
            print(e, file=sys.stderr)
    return 1 if bad else 0


def add_validate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="+", metavar="SPEC", help="job spec files (YAML or JSON)")
    p.add_argument("--json", action="store_true", help="one JSON object per spec: valid, problems")


def cmd_submit(args: argparse.Namespace) -> int:
    client = api_client(args)
    if client is not None:
        return _submit_to_server(client, args)
    good, bad = _load_specs(args.specs, args)
    _refuse_if_invalid(bad, len(args.specs))
    max_attempts = args.max_attempts or config_from_args(args).max_attempts
    ids = _with_store(
        args,
        lambda store: store.submit_many(
            [  # on this machine: the local admin
                NewJob(
                    spec=spec.to_dict(),
                    task=spec.name,
                    base_key=spec.base_model.base_key,
                    priority=spec.priority,
                    max_attempts=max_attempts,
                    tenant=LOCAL_TENANT,
                )
                for _, spec in good
            ]
        ),
    )
    _print_submitted(
        args,
        [(job_id, path, spec.name, spec.base_model.base_key, spec.priority) for job_id, (path, spec) in zip(ids, good)],
    )
    return 0


def _submit_to_server(client: ApiClient, args: argparse.Namespace) -> int:
    """Over HTTP: the server checks every spec (its paths relative to ITS data root) before any is queued."""
    checked, bad, uploaded = [], [], []
    for path in args.specs:
        try:
            text = Path(path).read_bytes()
            body = _with_uploads(client, path, text, uploaded)
        except OSError as e:
            bad.append(SpecError(path, [Problem("", f"cannot read the spec file: {e.strerror or e}")]))
            continue
        except ApiError as e:
            if e.status_code not in (413, 422):
                raise
            bad.append(SpecError(path, [Problem("", f"uploading its data: {e}")]))
            continue
        try:
            checked.append((path, body, client.validate(body)))
        except ApiError as e:
            if e.status_code not in (413, 422):
                raise
            bad.append(SpecError(path, [Problem(p, m) for p, m in e.problems] or [Problem("", e.detail)]))
    if bad:
        for file_id in uploaded:  # nothing is queued: take this run's uploads back (best effort)
            try:
                client.delete_file(file_id)
            except ApiError:
                pass
    _refuse_if_invalid(bad, len(args.specs))
    submitted = []
    for path, text, spec in checked:
        try:
            job_id = client.submit(text, max_attempts=args.max_attempts)
        except ApiError as e:  # the server went away, or the data changed under it since the check
            _print_submitted(args, submitted)
            raise CommandError(
                f"{path}: {e}\n{len(submitted)} of {len(checked)} specs were queued"
                f"{' (above)' if submitted else ''}; the rest were not"
            ) from None
        submitted.append((job_id, path, spec["task"], spec["base_key"], spec["priority"]))
    _print_submitted(args, submitted)
    return 0


def _with_uploads(client: ApiClient, spec_path: str, text: bytes, uploaded: list[str]) -> Any:
    """The spec to send: its text as is, or (when data.train / data.validation name files that exist here,
    relative to the spec file) the spec as a dict with those files uploaded and named by id, e.g.
    {'data': {'train': 'file-3f9c...'}}. Appends each upload's id to `uploaded`."""
    try:
        obj = parse_document(text, spec_path, fmt="yaml")
    except SpecError:
        return text  # the server says what is wrong with it
    data = obj.get("data") if isinstance(obj, dict) else None
    if not isinstance(data, dict):
        return text
    changed = False
    for key in ("train", "validation"):
        value = data.get(key)
        if not isinstance(value, str) or re.fullmatch(FILE_ID_PATTERN, value) or "://" in value:
            continue
        local = Path(spec_path).parent / Path(value).expanduser()
        if local.is_file():
            meta = client.upload(local)
            uploaded.append(meta["id"])
            data[key] = meta["id"]
            changed = True
    return obj if changed else text


def _refuse_if_invalid(bad: list[SpecError], total: int) -> None:
    if bad:
        for e in bad:
            print(e, file=sys.stderr)
        raise CommandError(f"{len(bad)} of {total} spec{'s' if total != 1 else ''} invalid; nothing was submitted")


def _print_submitted(args: argparse.Namespace, rows: list[tuple[str, str, str, str, int]]) -> None:
    """rows: (job id, spec file, name, base key, priority)."""
    if args.json:
        _print_json(
            [
                {"id": job_id, "name": name, "spec": path, "base_key": base_key, "priority": priority}
                for job_id, path, name, base_key, priority in rows
            ]
        )
    else:
        for job_id, path, name, _, _ in rows:
            print(f"{job_id}\t{name}\t{path}")


def add_submit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "specs",
        nargs="+",
        metavar="SPEC",
        help="job spec files; all are validated before any is queued. With --server the file's YAML "
        "text is sent; data files it names that exist here (relative to the spec file) are "
        "uploaded first, other paths are read relative to the server's data root",
    )
    p.add_argument("--json", action="store_true", help="print the queued jobs as JSON")
    p.add_argument(
        "--max-attempts",
        type=_positive_int,
        default=None,
        help="attempts per job before it fails for good (default 3; with --server, the server's)",
    )


def cmd_run(args: argparse.Namespace) -> int:
    from orchestrator.progress import ProgressView
    from orchestrator.scheduler import Orchestrator, Unschedulable

    config = reachable_storage(config_from_args(args, **_scheduler_settings(args)))
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

    config = reachable_storage(config_from_args(args, **_scheduler_settings(args)))
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


def _start_api(config: OrchestratorConfig, args: argparse.Namespace):
    """The HTTP API lives in orchestrator.api as `start_api(config, host=, port=)` returning a handle with
    `stop()`; until that module exists, serve runs without it."""
    try:
        api = importlib.import_module("orchestrator.api")
    except ModuleNotFoundError as e:
        if e.name != "orchestrator.api":
            raise
        print(
            "the HTTP API is not available yet (orchestrator.api is not installed); serving without it", file=sys.stderr
        )
        return None
    if not hasattr(api, "start_api"):
        print(
            "the HTTP API is not available yet (orchestrator.api has no start_api); serving without it", file=sys.stderr
        )
        return None
    try:
        return api.start_api(config, host=args.host, port=args.port, data_root=getattr(args, "data_root", None))
    except api.ApiStartError as e:
        raise CommandError(str(e)) from None


def cmd_status(args: argparse.Namespace) -> int:
    client = api_client(args)
    if args.job:
        job = client.status(args.job) if client else _with_store(args, lambda store: store.get(args.job))
        if args.json:
            _print_json(_job_dict(job))
        else:
            _print_job(job)
        return 0
    if client:
        jobs = client.list(state=args.state, limit=args.limit)
    else:
        jobs = _with_store(args, lambda store: store.list(state=args.state, limit=args.limit))
    if args.json:
        _print_json([_job_dict(j) for j in jobs])
    elif not jobs:
        print("no jobs" + (f" {args.state}" if args.state else ""))
    else:
        _print_table(jobs)
    return 0


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", metavar="JOB", help="a job id (default: every job)")
    p.add_argument("--json", action="store_true", help="print the job row(s) as JSON")
    p.add_argument("--state", choices=STATES, help="only jobs in this state")
    p.add_argument("--limit", type=_positive_int, help="only the newest this many jobs")


def cmd_list(args: argparse.Namespace) -> int:
    args.job = None
    return cmd_status(args)


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the job rows as JSON")
    p.add_argument("--state", choices=STATES, help="only jobs in this state")
    p.add_argument("--limit", type=_positive_int, help="only the newest this many jobs")


def cmd_cancel(args: argparse.Namespace) -> int:
    client = api_client(args)
    job = client.cancel(args.job) if client else _with_store(args, lambda store: store.request_cancel(args.job))
    if job.state == "cancelled":
        print(f"{job.id}: cancelled")
    else:
        print(f"{job.id}: cancel requested; it stops at its next step")
    return 0


def add_cancel_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", metavar="JOB", help="the job id")


def cmd_logs(args: argparse.Namespace) -> int:
    client = api_client(args)
    opts = dict(follow=args.follow, as_json=args.json)
    if client:
        return print_events(client.events, client.status, args.job, **opts)
    return _with_store(args, lambda store: print_events(store.events, store.get, args.job, **opts))


def add_logs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", metavar="JOB", help="the job id")
    p.add_argument("--json", action="store_true", help="print the events as JSON (with -f: one a line)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events until the job ends")


def cmd_schema(args: argparse.Namespace) -> int:
    _print_json(spec_json_schema())
    return 0


def add_schema_arguments(p: argparse.ArgumentParser) -> None:
    pass


# ---- registry commands: written in orchestrator/registry.py, loaded only when present ------------------


def _registry():
    """The orchestrator.registry module, or the reason it cannot be used."""
    try:
        return importlib.import_module("orchestrator.registry"), None
    except ModuleNotFoundError as e:
        if e.name == "orchestrator.registry":
            return None, "orchestrator.registry is not installed yet"
        return None, f"orchestrator.registry cannot be imported: {e}"
    except Exception as e:  # noqa: BLE001 - keep the other commands usable
        return None, f"orchestrator.registry cannot be imported: {type(e).__name__}: {e}"


def _registry_command(name: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        module, why = _registry()
        if module is None:
            raise CommandError(f"`prefixd {name}` is not available: {why}")
        return getattr(module, f"cmd_{name}")(args) or 0

    command.__name__ = f"cmd_{name}"
    return command


def _registry_arguments(name: str) -> Callable[[argparse.ArgumentParser], None]:
    def add(p: argparse.ArgumentParser) -> None:
        module, _ = _registry()
        if module is not None:  # else `main` lets any arguments through and the command says why it can't run
            getattr(module, f"add_{name}_arguments")(p)

    return add


# ---- registry commands through --server: same options and output, no MLflow or torch on this machine -----


def cmd_lookup(args: argparse.Namespace) -> int:
    client = api_client(args)
    if client is None:
        return _registry_command("lookup")(args)
    if getattr(args, "download", None) or getattr(args, "mlflow_uri", None):
        raise CommandError(
            "--download and --mlflow-uri work only without --server: the adapter files and "
            "the MLflow registry stay on the server"
        )
    try:
        info = client.lookup(args.task, alias=args.alias, version=args.version)
    except ApiError as e:
        return _registry_refusal("lookup", e)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print_version(info)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    client = api_client(args)
    if client is None:
        return _registry_command("models")(args)
    if getattr(args, "mlflow_uri", None):
        raise CommandError("--mlflow-uri works only without --server: the server uses its own registry")
    try:
        tags = parse_tag_filters(args.tag)
    except ValueError as e:
        print(f"prefixd models: error: {e}", file=sys.stderr)
        return 2
    try:
        models = client.models(base=args.base, tags=tags)
    except ApiError as e:
        return _registry_refusal("models", e)
    if args.json:
        print(json.dumps(models, indent=2, sort_keys=True))
    else:
        print_models(models, filtered=bool(args.base or tags))
    return 0


def _registry_refusal(verb: str, e: ApiError) -> int:
    """As orchestrator.registry's verbs: bad input (the server's 404 or 422) exits 2; the rest is raised."""
    if e.status_code not in (404, 422):
        raise e
    print(f"prefixd {verb}: error: {e}", file=sys.stderr)
    return 2


def add_server_lookup_arguments(p: argparse.ArgumentParser) -> None:
    """orchestrator.registry.add_lookup_arguments's options (a test keeps them equal), without importing it."""
    p.add_argument("task", help="task name (or registered model name)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--alias", help="an alias of the registered model (default: champion; 'latest' is the newest)")
    g.add_argument("--version", type=_positive_int, help="a version number")
    p.add_argument("--json", action="store_true", help="print the version as JSON")
    p.add_argument("--download", metavar="DIR", help="not available with --server")
    p.add_argument("--mlflow-uri", default=None, help="not available with --server")


def add_server_models_arguments(p: argparse.ArgumentParser) -> None:
    """orchestrator.registry.add_models_arguments's options (a test keeps them equal), without importing it."""
    p.add_argument(
        "--base",
        help="only versions of this base model: 'builtin:smollm2-135m', a folder, "
        "or the full 'kind:location@revision:dtype'",
    )
    p.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only versions with this tag (repeatable; all must match)",
    )
    p.add_argument("--json", action="store_true", help="print the models as JSON")
    p.add_argument("--mlflow-uri", default=None, help="not available with --server")


# ---- the table ------------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None]]] = {
    "validate": (cmd_validate, "check job specs and print every problem", add_validate_arguments),
    "submit": (cmd_submit, "validate job specs and queue them (all or none)", add_submit_arguments),
    "run": (cmd_run, "train every queued job on Ray, with live progress; exit when none is left", add_run_arguments),
    "serve": (cmd_serve, "keep scheduling jobs as they are submitted", add_serve_arguments),
    "status": (cmd_status, "show every job, or one", add_status_arguments),
    "list": (cmd_list, "list jobs (status without a job id)", add_list_arguments),
    "cancel": (cmd_cancel, "cancel a job (a running one stops at its next step)", add_cancel_arguments),
    "logs": (cmd_logs, "show a job's log", add_logs_arguments),
    "schema": (cmd_schema, "print the job spec JSON Schema", add_schema_arguments),
    "lookup": (cmd_lookup, "find trained prefixes in the registry", _registry_arguments("lookup")),
    "models": (cmd_models, "list registered models", _registry_arguments("models")),
    "generate": (
        _registry_command("generate"),
        "generate text with a registered prefix",
        _registry_arguments("generate"),
    ),
}


REGISTRY_COMMANDS = ("lookup", "models", "generate")
SERVER_COMMANDS = ("submit", "status", "list", "cancel", "logs", "lookup", "models")  # through --server
SERVER_IGNORED = ("validate", "schema")  # always local, whatever --server says
SERVER_REFUSED = ("run", "serve", "generate")  # they work on this machine: --server is refused
SERVER_ARGUMENTS = {"lookup": add_server_lookup_arguments, "models": add_server_models_arguments}


def _global_arguments(p: argparse.ArgumentParser, suppress: bool) -> None:
    # On the subcommands the defaults are suppressed, so a flag given before the command is not reset.
    default = argparse.SUPPRESS if suppress else None
    p.add_argument("--home", default=default, help="state folder (PREFIXD_HOME, default ~/.prefixd)")
    p.add_argument(
        "--store-url",
        default=default,
        help="SQLAlchemy URL of the job store (PREFIXD_STORE_URL; default sqlite in --home)",
    )
    p.add_argument(
        "--storage",
        default=default,
        metavar="URI",
        help="where job folders (checkpoints, results) live, reachable from every node (PREFIXD_STORAGE; "
        "default --home): a local or shared path, or s3://bucket/prefix[?endpoint_override=host:port"
        "&region=R&scheme=http]; S3 credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY",
    )
    p.add_argument(
        "--ray-address",
        default=default,
        help="Ray cluster to join (PREFIXD_RAY_ADDRESS; a token-auth cluster needs RAY_AUTH_MODE=token); "
        "default: start a private Ray on 127.0.0.1",
    )
    p.add_argument(
        "--server",
        default=default,
        metavar="URL",
        help=f"a `prefixd serve --api` to send {', '.join(SERVER_COMMANDS)} to ({SERVER_ENV}); the "
        f"token comes from {TOKEN_ENV}. Spec paths are then read on the server, relative to its "
        "data root",
    )


def build_parser(*, registry_arguments: bool = True, server: bool = False) -> argparse.ArgumentParser:
    """The argparse parser with one subcommand per COMMANDS entry. Without registry_arguments the registry
    commands take no arguments of their own (and no --help), so orchestrator.registry (which imports
    MLflow) is imported only when one of its commands runs. With server, lookup and models take
    SERVER_ARGUMENTS (the same options, defined here) and the registry is never imported."""
    parser = argparse.ArgumentParser(prog="prefixd", description="Multi-task prefix tuning on Ray.")
    _global_arguments(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text, add_arguments) in COMMANDS.items():
        if server and name in SERVER_ARGUMENTS:
            add_arguments = SERVER_ARGUMENTS[name]
        deferred = name in REGISTRY_COMMANDS and not registry_arguments and not (server and name in SERVER_ARGUMENTS)
        p = sub.add_parser(name, help=help_text, description=help_text, add_help=not deferred)
        _global_arguments(p, suppress=True)
        if not deferred:
            add_arguments(p)
    return parser


def _quiet_libraries() -> None:
    """A command prints its own output; the libraries' progress bars and advice would bury it."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    _quiet_libraries()
    try:
        parser = build_parser(registry_arguments=False)
        args, extra = parser.parse_known_args(argv)
        server = server_url(args)
        if server and args.command in SERVER_REFUSED:
            given = "--server" if getattr(args, "server", None) else f"{SERVER_ENV}"
            print(
                f"prefixd {args.command}: error: `prefixd {args.command}` works on this machine and cannot go "
                f"through a server; drop {given} ({server})",
                file=sys.stderr,
            )
            return 2
        if server and args.command in SERVER_ARGUMENTS:
            args = build_parser(registry_arguments=False, server=True).parse_args(argv)
        elif args.command in REGISTRY_COMMANDS:
            if _registry()[0] is not None:
                args = build_parser().parse_args(argv)
            # else: the command itself says why it cannot run, whatever its arguments
        elif extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    function = COMMANDS[args.command][0]
    try:
        return function(args) or 0
    except (CommandError, SpecError, UnknownJob, InvalidTransition, ApiError) as e:
        hint = f" (the token comes from {TOKEN_ENV})" if getattr(e, "status_code", None) in (401, 403) else ""
        print(f"prefixd {args.command}: error: {e}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prefixd {args.command}: interrupted", file=sys.stderr)
        return 130


# ---- scheduler flags and output helpers -----------------------------------------------------------------

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


def _scheduler_settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {dest: getattr(args, dest) for _, dest, _, _ in _SCHEDULER_FLAGS if getattr(args, dest) is not None}
    if "group_shapes" in settings:
        try:
            settings["group_shapes"] = read_group_shapes(settings["group_shapes"])
        except ValueError as e:
            raise CommandError(str(e)) from None
    return settings


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def _clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _step(job: Job) -> str:
    return f"{job.step or 0}/{job.total_steps}" if job.total_steps else "-"


def _print_table(jobs: list[Job]) -> None:
    rows = [("ID", "NAME", "STATE", "STEP", "LOSS", "ATTEMPTS", "UPDATED")]
    for j in jobs:
        state = j.state + ("*" if j.cancel_requested and j.state == "running" else "")
        rows.append(
            (
                j.id,
                j.task,
                state,
                _step(j),
                f"{j.loss:.4f}" if j.loss is not None else "-",
                f"{j.attempts}/{j.max_attempts}",
                _clock(j.updated_at),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    if any(j.cancel_requested and j.state == "running" for j in jobs):
        print("* cancel requested; stops at its next step")
    for base, reason in sorted({(j.base_key, j.waiting) for j in jobs if j.state == "queued" and j.waiting}):
        print(f"queued jobs of {base}: {reason}")


def _registration(job: Job) -> str | None:
    """Where a succeeded job is registered, or why not yet (MLflow down: retried with backoff)."""
    if job.registered:
        return f"{job.registry_model} v{job.registry_version}"
    if job.state != "succeeded":
        return None
    if job.registration_error:
        retry = f"; next try {_clock(job.next_registration_at)}" if job.next_registration_at else ""
        return (
            f"not yet: {job.registration_attempts} attempt(s) failed ({job.registration_error.splitlines()[0]})" + retry
        )
    return "not yet (the orchestrator registers finished jobs in MLflow)"


def _print_job(job: Job) -> None:
    fields = [
        ("id", job.id),
        ("name", job.task),
        ("state", job.state + (" (cancel requested)" if job.cancel_requested and job.state == "running" else "")),
        ("base model", job.base_key),
        ("priority", job.priority),
        ("step", _step(job)),
        ("loss", f"{job.loss:.4f}" if job.loss is not None else None),
        ("tokens/s", f"{job.tokens_per_s:,.0f}" if job.tokens_per_s else None),
        ("attempts", f"{job.attempts} of {job.max_attempts}"),
        ("submitted", _clock(job.created_at)),
        ("started", _clock(job.started_at) if job.started_at else None),
        ("finished", _clock(job.finished_at) if job.finished_at else None),
        ("waiting", job.waiting if job.state == "queued" else None),
        ("result", job.result_dir),
        ("error", job.error),
        ("registered", _registration(job)),
    ]
    for name, value in fields:
        if value is not None:
            print(f"{name + ':':<12} {value}")
    if job.result_dir and (Path(job.result_dir) / "metrics.json").is_file():
        metrics = json.loads((Path(job.result_dir) / "metrics.json").read_text(encoding="utf-8"))
        print(f"{'metrics:':<12} " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))


if __name__ == "__main__":
    sys.exit(main())
