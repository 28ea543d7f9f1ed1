"""The job commands: validate, submit, status, list, cancel, logs, schema, and how jobs print.

    prefixd validate SPEC...      every problem of every file, exit 1 if any
    prefixd submit SPEC...        queue them (all or none); prints the job ids
    prefixd status [JOB] [--json] the queue, or one job

Each works on the local job store as its admin, or (submit, status, list, cancel, logs) through `--server`
with the same output; a `--server` submit uploads the data files a spec names that exist on this machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path
from typing import Any

from jobs.bounds import SpecBounds
from jobs.spec import Problem, SpecError, load_specs, parse_document, spec_json_schema
from jobs.sweep import job_entries
from jobs.validate_data import FILE_ID_PATTERN
from orchestrator.client import ApiClient, ApiError
from orchestrator.commands.common import (
    CommandError,
    api_client,
    clock,
    config_from_args,
    positive_int,
    print_json,
    with_store,
)
from orchestrator.logs import print_events
from orchestrator.store import STATES, Job
from orchestrator.tenants import LOCAL_TENANT


def _load_specs(paths: list[str], args: argparse.Namespace) -> tuple[list[tuple[str, list]], list[SpecError]]:
    """Each spec file read and checked within the operator's bounds (config.spec_bounds): (path, its
    [(variant label, JobSpec)]: one without a label, or a sweep's variants)."""
    bounds = SpecBounds(config_from_args(args).spec_bounds)
    good, bad = [], []
    for path in paths:
        try:
            good.append((path, load_specs(path, bounds=bounds)))
        except SpecError as e:
            bad.append(e)
    return good, bad


def _described(variants: list) -> str:
    spec = variants[0][1]
    sweep = f", a sweep of {len(variants)} variants" if variants[0][0] is not None else ""
    return f"{spec.name}, base {spec.base_model.base_key}{sweep}"


def _job_dict(job: Job) -> dict[str, Any]:
    return dataclasses.asdict(job)


def cmd_validate(args: argparse.Namespace) -> int:
    good, bad = _load_specs(args.specs, args)
    if args.json:
        print_json(
            [
                {
                    "spec": p,
                    "valid": True,
                    "name": v[0][1].name,
                    "base_key": v[0][1].base_model.base_key,
                    "variants": len(v),
                    "problems": [],
                }
                for p, v in good
            ]
            + [{"spec": e.source, "valid": False, "problems": [str(p) for p in e.problems]} for e in bad]
        )
    else:
        for path, variants in good:
            print(f"{path}: ok ({_described(variants)})")
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
    # on this machine: the local admin
    per_file = [
        (path, job_entries(variants, max_attempts=max_attempts, tenant=LOCAL_TENANT)) for path, variants in good
    ]
    entries = [entry for _, file_entries in per_file for entry in file_entries]
    ids = with_store(args, lambda store: store.submit_many(entries))
    paths = [path for path, file_entries in per_file for _ in file_entries]
    _print_submitted(args, [_submitted_row(job_id, path, e) for job_id, path, e in zip(ids, paths, entries)])
    return 0


def _submitted_row(job_id: str, path: str, entry: dict[str, Any]) -> dict[str, Any]:
    keys = ("task", "base_key", "priority", "sweep_id", "sweep_variant")
    return {"id": job_id, "spec": path} | {k: entry.get(k) for k in keys}


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
            queued = client.submit_jobs(text, max_attempts=args.max_attempts)
        except ApiError as e:  # the server went away, or the data changed under it since the check
            _print_submitted(args, submitted)
            raise CommandError(
                f"{path}: {e}\n{len(submitted)} of {len(checked)} specs were queued"
                f"{' (above)' if submitted else ''}; the rest were not"
            ) from None
        sweep = {"sweep_id": queued["sweep_id"]}
        submitted += [
            _submitted_row(job_id, path, spec | sweep | {"sweep_variant": variant})
            for job_id, variant in zip(queued["job_ids"], queued["variants"])
        ]
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


def _print_submitted(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    """rows: {id, spec (its file), task, base_key, priority, sweep_id, sweep_variant}."""
    if args.json:
        print_json(
            [{"id": r["id"], "name": r["task"]} | {k: v for k, v in r.items() if k not in ("id", "task")} for r in rows]
        )
        return
    for r in rows:
        print("\t".join([r["id"], r["task"], r["spec"]] + ([r["sweep_variant"]] if r.get("sweep_variant") else [])))
    for sweep_id in dict.fromkeys(r["sweep_id"] for r in rows if r.get("sweep_id")):
        print(f"sweep {sweep_id}: prefixd status --sweep {sweep_id}")


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
        type=positive_int,
        default=None,
        help="attempts per job before it fails for good (default 3; with --server, the server's)",
    )


def cmd_status(args: argparse.Namespace) -> int:
    client = api_client(args)
    if args.job:
        job = client.status(args.job) if client else with_store(args, lambda store: store.get(args.job))
        if args.json:
            print_json(_job_dict(job))
        else:
            _print_job(job)
        return 0
    sweep = getattr(args, "sweep", None)
    if client:
        jobs = client.list(state=args.state, limit=args.limit, sweep=sweep)
    else:
        jobs = with_store(args, lambda store: store.list(state=args.state, limit=args.limit, sweep=sweep))
    if args.json:
        print_json([_job_dict(j) for j in jobs])
    elif not jobs:
        print("no jobs" + (f" {args.state}" if args.state else "") + (f" in sweep {sweep}" if sweep else ""))
    elif sweep:
        _print_sweep(jobs)
    else:
        _print_table(jobs)
    return 0


def add_status_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", nargs="?", metavar="JOB", help="a job id (default: every job)")
    p.add_argument("--json", action="store_true", help="print the job row(s) as JSON")
    p.add_argument("--state", choices=STATES, help="only jobs in this state")
    p.add_argument("--limit", type=positive_int, help="only the newest this many jobs")
    p.add_argument("--sweep", metavar="ID", help="a sweep's variants side by side, the best one marked")


def cmd_list(args: argparse.Namespace) -> int:
    args.job = None
    return cmd_status(args)


def add_list_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the job rows as JSON")
    p.add_argument("--state", choices=STATES, help="only jobs in this state")
    p.add_argument("--limit", type=positive_int, help="only the newest this many jobs")


def cmd_cancel(args: argparse.Namespace) -> int:
    client = api_client(args)
    job = client.cancel(args.job) if client else with_store(args, lambda store: store.request_cancel(args.job))
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
    return with_store(args, lambda store: print_events(store.events, store.get, args.job, **opts))


def add_logs_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("job", metavar="JOB", help="the job id")
    p.add_argument("--json", action="store_true", help="print the events as JSON (with -f: one a line)")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events until the job ends")


def cmd_estimate(args: argparse.Namespace) -> int:
    """Each spec's cost before it runs (every variant of a sweep), locally or by the server (its data root)."""
    client = api_client(args)
    reports = []
    for path in args.specs:
        if client:
            reports += [r | {"spec": path} for r in client.estimate(Path(path).read_bytes())]
            continue
        good, bad = _load_specs([path], args)
        _refuse_if_invalid(bad, 1)
        reports += [r | {"spec": path} for r in with_store(args, lambda store: _estimate_here(store, good[0][1], args))]
    if args.json:
        print_json(reports)
    else:
        print("\n\n".join(_estimate_text(r) for r in reports))
    return 0


def _estimate_here(store, variants: list, args: argparse.Namespace) -> list[dict[str, Any]]:
    from orchestrator.estimates import estimate_spec, measured_throughput  # torch and transformers: only here

    config, running = config_from_args(args), store.list(state="running")
    try:
        return [
            estimate_spec(
                spec,
                throughput=measured_throughput(running, spec.base_model.base_key),
                micro_batch_size=config.micro_batch_size,
                model_cache=str(config.model_cache),
                data_cache=str(config.data_cache),
            )
            | {"variant": label}
            for label, spec in variants
        ]
    except ValueError as e:  # ModelLoadError, DataError: the spec is valid, its model or data cannot be used
        raise CommandError(f"cannot estimate {variants[0][1].name}: {e}") from None


def _estimate_text(report: dict[str, Any]) -> str:
    from orchestrator.estimates import format_estimate

    variant = f" [{report['variant']}]" if report.get("variant") else ""
    return f"{report['spec']}{variant}: " + format_estimate(report)


def add_estimate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="+", metavar="SPEC", help="job spec files (YAML or JSON)")
    p.add_argument("--json", action="store_true", help="print the estimates as JSON")


def cmd_schema(args: argparse.Namespace) -> int:
    print_json(spec_json_schema())
    return 0


def add_schema_arguments(p: argparse.ArgumentParser) -> None:
    pass


# ---- how jobs print ----------------------------------------------------------------------------------


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
                clock(j.updated_at),
            )
        )
    _print_rows(rows)
    if any(j.cancel_requested and j.state == "running" for j in jobs):
        print("* cancel requested; stops at its next step")
    for base, reason in sorted({(j.base_key, j.waiting) for j in jobs if j.state == "queued" and j.waiting}):
        print(f"queued jobs of {base}: {reason}")


def _print_rows(rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _print_sweep(jobs: list[Job]) -> None:
    """A sweep's variants side by side: each one's latest evaluation of the registry metric; the best marked."""
    registry = jobs[0].spec.get("registry", {})
    metric, direction = registry.get("metric", "eval_loss"), registry.get("direction", "minimize")
    value = {j.id: (j.last_eval or {}).get(metric) for j in jobs}
    scored = [j for j in jobs if value[j.id] is not None]
    pick = min if direction == "minimize" else max
    best = pick(scored, key=lambda j: value[j.id]).id if scored else None
    rows = [("ID", "VARIANT", "STATE", "STEP", "LOSS", metric.upper(), "AT STEP")]
    for j in jobs:
        at = (j.last_eval or {}).get("step")
        rows.append(
            (
                j.id + (" *" if j.id == best else ""),
                j.sweep_variant or "-",
                j.state,
                _step(j),
                f"{j.loss:.4f}" if j.loss is not None else "-",
                f"{value[j.id]:.4f}" if value[j.id] is not None else "-",
                str(at) if at is not None else "-",
            )
        )
    _print_rows(rows)
    if best:
        print(f"* best so far by {metric} ({direction}); the registry's champion follows the same rule")


def _registration(job: Job) -> str | None:
    """Where a succeeded job is registered, or why not yet (MLflow down: retried with backoff)."""
    if job.registered:
        return f"{job.registry_model} v{job.registry_version}"
    if job.state != "succeeded":
        return None
    if job.registration_error:
        retry = f"; next try {clock(job.next_registration_at)}" if job.next_registration_at else ""
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
        ("submitted", clock(job.created_at)),
        ("started", clock(job.started_at) if job.started_at else None),
        ("finished", clock(job.finished_at) if job.finished_at else None),
        ("est. finish", clock(job.estimated_finish) if job.estimated_finish else None),
        ("waiting", job.waiting if job.state == "queued" else None),
        ("result", job.result_dir),
        ("error", job.error),
        ("registered", _registration(job)),
        ("mlflow run", job.run_id),
    ]
    for name, value in fields:
        if value is not None:
            print(f"{name + ':':<12} {value}")
    if job.result_dir and (Path(job.result_dir) / "metrics.json").is_file():
        metrics = json.loads((Path(job.result_dir) / "metrics.json").read_text(encoding="utf-8"))
        print(f"{'metrics:':<12} " + ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items())))
