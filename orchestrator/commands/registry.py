"""The registry commands, each written once for this machine's MLflow registry and for a server's.

    prefixd lookup TASK [--alias A | --version N] [--json] [--download DIR]
    prefixd models [--base BASE] [--tag k=v ...] [--json]
    prefixd generate --task A [--task B ...] [--alias A | --version N] [--max-new-tokens N] PROMPT...

`lookup` and `models` ask a `Registry`: `LocalRegistry` (MLflow at --mlflow-uri, else $MLFLOW_TRACKING_URI,
else the sqlite database under the prefixd home) or, with `--server`, the server's API
(`orchestrator.client.ApiClient`); both print the same text and JSON. `generate` runs every prompt with
every task's prefix, all rows in one mixed-prefix batch, on this machine only. Bad input (an unknown task,
alias or version, a malformed filter; the server's 404 or 422) exits 2; MLflow refusing or unreachable
exits 1. Nothing here imports MLflow or torch until a command runs locally: `prefixd status` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from orchestrator.client import ApiError
from orchestrator.commands.common import BadInput, CommandError, api_client, positive_int

CHAMPION = "champion"  # orchestrator.registry.CHAMPION: what a lookup without alias or version means


class Registry(Protocol):
    """What `prefixd lookup` and `prefixd models` ask of a registry, local or a server's."""

    def lookup(self, task: str, alias: str | None = None, version: int | None = None) -> dict[str, Any]:
        """One registered version (orchestrator.registry.lookup's dict); neither alias nor version: the champion."""
        ...

    def search_models(self, base: str | None = None, tags: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """prefixd's registered models (orchestrator.registry.search_models's dicts)."""
        ...


@dataclass(frozen=True)
class LocalRegistry:
    """The MLflow registry at `tracking_uri`, on this machine. Its errors become BadInput (a RegistryError:
    exit 2) or CommandError (MLflow's own: exit 1)."""

    tracking_uri: str

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LocalRegistry:
        from orchestrator.registry import tracking_uri_from_args

        return cls(tracking_uri_from_args(args))

    def lookup(self, task: str, alias: str | None = None, version: int | None = None) -> dict[str, Any]:
        from orchestrator import registry

        with _local_errors():
            return registry.lookup(self.tracking_uri, task, alias=alias, version=version)

    def search_models(self, base: str | None = None, tags: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        from orchestrator import registry

        with _local_errors():
            return registry.search_models(self.tracking_uri, base=base, tags=tags)

    def download(self, name: str, version: str, dst: str) -> Path:
        """The version's PEFT adapter files into folder dst (see orchestrator.registry.download)."""
        from orchestrator import registry

        with _local_errors():
            return registry.download(self.tracking_uri, name, version=version, dst=dst)

    def generate(self, tasks: Sequence[str], prompts: Sequence[str], **options: Any) -> list[dict[str, Any]]:
        """orchestrator.generation.generate's results: one entry per task, each with one output per prompt."""
        from orchestrator.generation import generate

        with _local_errors():
            return generate(self.tracking_uri, tasks, prompts, **options)

    def generate_pairs(self, pairs_file: str, **options: Any) -> list[dict[str, Any]]:
        """orchestrator.pairs.generate_pairs's results: each prompt of the file with its own task's prefix."""
        from orchestrator.pairs import generate_pairs, read_pairs

        with _local_errors():
            return generate_pairs(self.tracking_uri, read_pairs(pairs_file), **options)


@contextmanager
def _local_errors() -> Iterator[None]:
    from mlflow.exceptions import MlflowException

    from orchestrator.registry import RegistryError

    try:
        yield
    except RegistryError as e:
        raise BadInput(str(e)) from None
    except MlflowException as e:
        raise CommandError(str(e)) from None


def registry_from_args(args: argparse.Namespace) -> Registry:
    """The server's API with --server (refusing the options that only work here), else LocalRegistry."""
    client = api_client(args)
    if client is None:
        return LocalRegistry.from_args(args)
    if getattr(args, "download", None) or getattr(args, "mlflow_uri", None):
        raise CommandError(
            "--download and --mlflow-uri work only without --server: the adapter files and "
            "the MLflow registry stay on the server"
        )
    return client


@contextmanager
def _server_refusals() -> Iterator[None]:
    """The server refusing bad input (404, 422) exits 2, as the local registry's RegistryError does."""
    try:
        yield
    except ApiError as e:
        if e.status_code in (404, 422):
            raise BadInput(str(e)) from None
        raise


# ---- commands ---------------------------------------------------------------------------------------------


def cmd_lookup(args: argparse.Namespace) -> int:
    registry = registry_from_args(args)
    with _server_refusals():
        info = registry.lookup(args.task, alias=args.alias, version=args.version)
    if args.download:  # local only: registry_from_args refuses --download with --server
        registry.download(info["name"], info["version"], args.download)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print_version(info)
    if args.download:
        print(f"adapter written to {args.download}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    tags = parse_tag_filters(args.tag)
    registry = registry_from_args(args)
    with _server_refusals():
        models = registry.search_models(base=args.base, tags=tags)
    if args.json:
        print(json.dumps(models, indent=2, sort_keys=True))
    else:
        print_models(models, filtered=bool(args.base or tags))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    if args.max_new_tokens < 1:
        raise BadInput(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    options = dict(
        alias=args.alias,
        version=args.version,
        max_new_tokens=args.max_new_tokens,
        with_base=args.with_base,
        device=args.device,
    )
    if args.pairs:
        if args.tasks or args.prompts:
            raise BadInput("--pairs takes the tasks and prompts from its file: give no --task or PROMPT")
        results = LocalRegistry.from_args(args).generate_pairs(args.pairs, **options)
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            _print_pairs(results)
        return 0
    if not args.tasks or not args.prompts:
        raise BadInput("give at least one --task and one PROMPT (or --pairs FILE)")
    results = LocalRegistry.from_args(args).generate(args.tasks, args.prompts, **options)
    if args.json:
        print(json.dumps([{**r, "prompts": args.prompts} for r in results], indent=2))
        return 0
    for r in results:
        print(f"== {r['task']} ({r['name']} v{r['version']})" if r["task"] else f"== ({r['name']})")
        for prompt, output in zip(args.prompts, r["outputs"]):
            print(f"{_one_line(prompt)}\t{_one_line(output)}")
    return 0


# ---- arguments --------------------------------------------------------------------------------------------


def _add_uri_argument(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a value given to the main parser is not overwritten by this subparser's default.
    p.add_argument(
        "--mlflow-uri",
        default=argparse.SUPPRESS,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under the prefixd home; "
        "not with --server)",
    )


def _add_version_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--alias", help=f"an alias of the registered model (default: {CHAMPION}; 'latest' is the newest)")
    g.add_argument("--version", type=positive_int, help="a version number")


def add_lookup_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("task", help="task name (or registered model name)")
    _add_version_arguments(p)
    p.add_argument("--json", action="store_true", help="print the version as JSON")
    p.add_argument("--download", metavar="DIR", help="also put its PEFT adapter files into DIR (not with --server)")
    _add_uri_argument(p)


def add_models_arguments(p: argparse.ArgumentParser) -> None:
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
    _add_uri_argument(p)


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--task",
        action="append",
        default=[],
        dest="tasks",
        metavar="TASK",
        help="task (or registered model) whose prefix to use; repeat for several, all in one batch",
    )
    _add_version_arguments(p)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the outputs as JSON")
    p.add_argument("--with-base", action="store_true", help="also show the base model's outputs without a prefix")
    p.add_argument(
        "--device",
        default="auto",
        help="where to generate: auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:N",
    )
    p.add_argument(
        "--pairs",
        metavar="FILE",
        help="instead of --task and PROMPTs: JSON lines {task, prompt, expected}, each prompt with its own "
        "task's prefix, all in one batch, outputs marked right or wrong",
    )
    p.add_argument("prompts", nargs="*", metavar="PROMPT", help="each prompt is run with every task")
    _add_uri_argument(p)


# ---- output -----------------------------------------------------------------------------------------------


def parse_tag_filters(items: Iterable[str]) -> dict[str, str]:
    """`--tag KEY=VALUE` values as a dict; BadInput naming the first malformed one."""
    tags = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise BadInput(f"--tag {item!r}: expected KEY=VALUE")
        tags[key] = value
    return tags


def print_version(info: dict) -> None:
    """One registered version (a `lookup` result), as text."""
    print(f"{info['name']} v{info['version']}" + (f" ({', '.join(info['aliases'])})" if info["aliases"] else ""))
    rows = [
        ("task", info["task"]),
        ("job", info["job_id"]),
        ("run", info["run_id"]),
        ("source", info["source"]),
        ("base model", info["base_model"]),
        ("base sha256", info["base_model_sha256"]),
    ]
    rows += [(k, f"{v:.6g}") for k, v in sorted(info["metrics"].items())]
    rows += [(f"tag {k}", v) for k, v in sorted(info["tags"].items()) if not k.startswith("prefixd.")]
    for key, value in rows:
        if value is not None:
            print(f"  {key:<14} {value}")


def print_models(models: list[dict], *, filtered: bool) -> None:
    """Registered models (a `models` result) as a table."""
    if not models:
        print("no registered prefixd models" + (" match" if filtered else ""))
        return
    header = ("MODEL", "TASK", "CHAMPION", "LATEST", "VERSIONS", "BASE MODEL")
    rows = [
        (
            m["name"],
            m["task"] or "",
            m["champion_version"] or "-",
            m["latest_version"],
            ",".join(m["versions"]),
            "; ".join(m["base_models"]),
        )
        for m in models
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header) - 1)]
    for r in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])


def _print_pairs(results: Sequence[dict[str, Any]]) -> None:
    """Per task (first-seen order): a header counting the scored rows that are right, then one line per prompt:
    prompt | expected: ... | prefix: ... [right] | bare: ... [wrong], columns aligned."""
    by_task: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_task.setdefault(r["task"], []).append(r)
    for task, rows in by_task.items():
        head = f"== {task} ({rows[0]['name']} v{rows[0]['version']})"
        scored = [r for r in rows if r["expected"] is not None]
        if scored:
            head += f": with its prefix {sum(r['right'] for r in scored)}/{len(scored)} right"
            if "base_output" in rows[0]:
                head += f", bare base model {sum(r['base_right'] for r in scored)}/{len(scored)}"
        print(head)
        columns = [[_one_line(r["prompt"]) for r in rows]]
        if scored:
            columns.append([f"expected: {_one_line(r['expected'] or '')}" for r in rows])
        columns.append([f"prefix: {_one_line(r['output'])}{_mark(r['right'])}" for r in rows])
        if "base_output" in rows[0]:
            columns.append([f"bare: {_one_line(r['base_output'])}{_mark(r['base_right'])}" for r in rows])
        widths = [max(len(c) for c in col) for col in columns[:-1]]
        for cells in zip(*columns):
            print("  " + " | ".join([c.ljust(w) for c, w in zip(cells, widths)] + [cells[-1]]))


def _mark(right: bool | None) -> str:
    return "" if right is None else ("  [right]" if right else "  [wrong]")


def _one_line(text: str) -> str:
    """Keep one prompt and its output on one line: newlines written as \\n."""
    return text.replace("\n", "\\n")
