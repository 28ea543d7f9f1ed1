"""What every `prefixd` command shares: its errors, the config and job store from the global flags, the
API client for `--server`, and small output helpers.

    config = config_from_args(args)                  # OrchestratorConfig from --home, --store-url, ...
    jobs = with_store(args, lambda store: store.list())
    client = api_client(args)                        # ApiClient for --server / $PREFIXD_SERVER, else None
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from typing import Any

from orchestrator.client import ApiClient
from orchestrator.config import OrchestratorConfig
from orchestrator.store import JobStore

SERVER_ENV = "PREFIXD_SERVER"
TOKEN_ENV = "PREFIXD_TOKEN"


class CommandError(Exception):
    """A user error: printed as `prefixd <command>: error: <message>`, exit status 1."""

    exit_status = 1


class BadInput(CommandError):
    """Input the registry refuses (an unknown task, alias or version; a malformed filter): exit status 2."""

    exit_status = 2


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


def with_store(args: argparse.Namespace, read: Callable[[JobStore], Any]) -> Any:
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


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, allow_nan=False))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def clock(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"
