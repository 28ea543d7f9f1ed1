"""The registry's CLI verbs (functions; the `prefixd` command table wires them). Each returns an exit code.

    prefixd lookup TASK [--alias A | --version N] [--json] [--download DIR]
    prefixd models [--base BASE] [--tag k=v ...] [--json]
    prefixd generate --task A [--task B ...] [--alias A | --version N] [--max-new-tokens N] PROMPT...

Bad input (RegistryError) prints one line and exits 2; an MLflow error exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys

from orchestrator.registry.client import CHAMPION, RegistryError, tracking_uri_from_args
from orchestrator.registry.lookup import download, lookup, search_models
from orchestrator.registry_text import parse_tag_filters, print_models, print_version


def _add_uri_argument(p: argparse.ArgumentParser) -> None:
    # SUPPRESS: a value given to the main parser is not overwritten by this subparser's default.
    p.add_argument(
        "--mlflow-uri",
        default=argparse.SUPPRESS,
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite under the prefixd home)",
    )


def _add_version_arguments(p: argparse.ArgumentParser, default: str) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--alias", help=f"an alias of the registered model (default: {default}; 'latest' is the newest)")
    g.add_argument("--version", help="a version number")


def add_lookup_arguments(p: argparse.ArgumentParser) -> None:
    """prefixd lookup TASK [--alias A | --version N] [--json] [--download DIR]"""
    p.add_argument("task", help="task name (or registered model name)")
    _add_version_arguments(p, CHAMPION)
    p.add_argument("--json", action="store_true", help="print the version as JSON")
    p.add_argument("--download", metavar="DIR", help="also put its PEFT adapter files into DIR")
    _add_uri_argument(p)


def add_models_arguments(p: argparse.ArgumentParser) -> None:
    """prefixd models [--base BASE] [--tag k=v ...] [--json]"""
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
    """prefixd generate --task A [--task B ...] [--alias champion] [--max-new-tokens N] PROMPT..."""
    p.add_argument(
        "--task",
        action="append",
        required=True,
        dest="tasks",
        metavar="TASK",
        help="task (or registered model) whose prefix to use; repeat for several, all in one batch",
    )
    _add_version_arguments(p, CHAMPION)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--json", action="store_true", help="print the outputs as JSON")
    p.add_argument("--with-base", action="store_true", help="also show the base model's outputs without a prefix")
    p.add_argument(
        "--device",
        default="auto",
        help="where to generate: auto (the GPU when there is one, else the CPU), cpu, cuda, cuda:N",
    )
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="each prompt is run with every task")
    _add_uri_argument(p)


def _fail(verb: str, e: Exception) -> int:
    """Bad input (RegistryError): exit 2; MLflow refusing or unreachable: exit 1."""
    print(f"prefixd {verb}: error: {e}", file=sys.stderr)
    return 2 if isinstance(e, RegistryError) else 1


def _errors() -> tuple[type[Exception], ...]:
    from mlflow.exceptions import MlflowException

    return RegistryError, MlflowException


def cmd_lookup(args: argparse.Namespace) -> int:
    try:
        uri = tracking_uri_from_args(args)
        info = lookup(uri, args.task, alias=args.alias, version=args.version)
        if args.download:
            download(uri, info["name"], version=info["version"], dst=args.download)
    except _errors() as e:
        return _fail("lookup", e)
    if args.json:
        print(json.dumps(info, indent=2, sort_keys=True))
    else:
        print_version(info)
    if args.download:
        print(f"adapter written to {args.download}", file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    try:
        tags = parse_tag_filters(args.tag)
    except ValueError as e:
        return _fail("models", RegistryError(str(e)))
    try:
        models = search_models(tracking_uri_from_args(args), base=args.base, tags=tags)
    except _errors() as e:
        return _fail("models", e)
    if args.json:
        print(json.dumps(models, indent=2, sort_keys=True))
    else:
        print_models(models, filtered=bool(args.base or tags))
    return 0


def _one_line(text: str) -> str:
    """Keep one prompt and its output on one line: newlines written as \\n."""
    return text.replace("\n", "\\n")


def cmd_generate(args: argparse.Namespace) -> int:
    from orchestrator.generation import generate  # it imports this package

    if args.max_new_tokens < 1:
        return _fail("generate", RegistryError(f"--max-new-tokens {args.max_new_tokens}: must be >= 1"))
    try:
        results = generate(
            tracking_uri_from_args(args),
            args.tasks,
            args.prompts,
            alias=args.alias,
            version=args.version,
            max_new_tokens=args.max_new_tokens,
            with_base=getattr(args, "with_base", False),
            device=getattr(args, "device", "auto"),
        )
    except _errors() as e:
        return _fail("generate", e)
    if args.json:
        print(json.dumps([{**r, "prompts": args.prompts} for r in results], indent=2))
        return 0
    for r in results:
        print(f"== {r['task']} ({r['name']} v{r['version']})" if r["task"] else f"== ({r['name']})")
        for prompt, output in zip(args.prompts, r["outputs"]):
            print(f"{_one_line(prompt)}\t{_one_line(output)}")
    return 0
