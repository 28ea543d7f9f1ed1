"""The `prefixd` command line: one plain function per command, all listed in COMMANDS.

    prefixd validate jobs/examples/*.yaml        check specs; every problem of every file, exit 1 if any
    prefixd submit jobs/examples/*.yaml          queue them (all or none); prints the job ids
    prefixd run                                  train every queued job, live progress; exit when done
    prefixd serve [--api]                        keep scheduling jobs as they are submitted (and serve HTTP)
    prefixd status [JOB] [--json]                the queue, or one job (--sweep ID: a sweep's variants)
    prefixd estimate SPEC...                     tokens, time and memory a spec will take, before it runs
    prefixd cancel JOB                           a queued job at once, a running one at its next step
    prefixd logs JOB [-f]                        a job's events (state changes, metrics, errors); -f follows
    prefixd schema                               the job spec's JSON Schema
    prefixd lookup | models | generate           the trained-prefix registry (orchestrator/commands/registry.py)

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
import os
import sys
from collections.abc import Callable

from jobs.spec import SpecError
from orchestrator import serving_cli as serve_models
from orchestrator.client import ApiError
from orchestrator.commands import jobs, registry, serving
from orchestrator.commands.common import SERVER_ENV, TOKEN_ENV, CommandError, server_url
from orchestrator.store import InvalidTransition, UnknownJob

Command = tuple[Callable[[argparse.Namespace], int], str, Callable[[argparse.ArgumentParser], None]]

COMMANDS: dict[str, Command] = {
    "validate": (jobs.cmd_validate, "check job specs and print every problem", jobs.add_validate_arguments),
    "submit": (jobs.cmd_submit, "validate job specs and queue them (all or none)", jobs.add_submit_arguments),
    "run": (
        serving.cmd_run,
        "train every queued job on Ray, with live progress; exit when none is left",
        serving.add_run_arguments,
    ),
    "serve": (serving.cmd_serve, "keep scheduling jobs as they are submitted", serving.add_serve_arguments),
    "status": (jobs.cmd_status, "show every job, or one", jobs.add_status_arguments),
    "list": (jobs.cmd_list, "list jobs (status without a job id)", jobs.add_list_arguments),
    "cancel": (jobs.cmd_cancel, "cancel a job (a running one stops at its next step)", jobs.add_cancel_arguments),
    "logs": (jobs.cmd_logs, "show a job's log", jobs.add_logs_arguments),
    "estimate": (
        jobs.cmd_estimate,
        "what specs will cost before they run: tokens, time, memory",
        jobs.add_estimate_arguments,
    ),
    "schema": (jobs.cmd_schema, "print the job spec JSON Schema", jobs.add_schema_arguments),
    "lookup": (registry.cmd_lookup, "find trained prefixes in the registry", registry.add_lookup_arguments),
    "models": (registry.cmd_models, "list registered models", registry.add_models_arguments),
    "generate": (registry.cmd_generate, "generate text with a registered prefix", registry.add_generate_arguments),
    "serve-models": (
        serve_models.cmd_serve_models,
        "serve every registered prefix, OpenAI-compatible",
        serve_models.add_serve_models_arguments,
    ),
}

SERVER_COMMANDS = ("submit", "status", "list", "cancel", "logs", "estimate", "lookup", "models")  # through --server
SERVER_IGNORED = ("validate", "schema")  # always local, whatever --server says
SERVER_REFUSED = ("run", "serve", "generate", "serve-models")  # they work on this machine: --server is refused


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


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser with one subcommand per COMMANDS entry, global flags before or after it."""
    parser = argparse.ArgumentParser(prog="prefixd", description="Multi-task prefix tuning on Ray.")
    _global_arguments(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text, add_arguments) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        _global_arguments(p, suppress=True)
        add_arguments(p)
    return parser


def _quiet_libraries() -> None:
    """A command prints its own output; the libraries' progress bars and advice would bury it."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit status. Output cut short by its reader (`prefixd status | head`)
    ends quietly with 141, as a shell reports a command killed by SIGPIPE."""
    _quiet_libraries()
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as e:  # --help (0) or a usage error (2), already printed by argparse
        return e.code if isinstance(e.code, int) else 2
    try:
        code = _run(args)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        # Python flushes stdout again at exit: point it at /dev/null so that flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


def _run(args: argparse.Namespace) -> int:
    server = server_url(args)
    if server and args.command in SERVER_REFUSED:
        given = "--server" if getattr(args, "server", None) else SERVER_ENV
        print(
            f"prefixd {args.command}: error: `prefixd {args.command}` works on this machine and cannot go "
            f"through a server; drop {given} ({server})",
            file=sys.stderr,
        )
        return 2
    function = COMMANDS[args.command][0]
    try:
        return function(args) or 0
    except (CommandError, SpecError, UnknownJob, InvalidTransition, ApiError) as e:
        hint = f" (the token comes from {TOKEN_ENV})" if getattr(e, "status_code", None) in (401, 403) else ""
        print(f"prefixd {args.command}: error: {e}{hint}", file=sys.stderr)
        return getattr(e, "exit_status", 1)
    except KeyboardInterrupt:
        print(f"prefixd {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
