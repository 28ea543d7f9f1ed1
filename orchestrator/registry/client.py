"""The registry's MLflow access: tag names, errors, the tracking URI, one client per call, outages.

    with mlflow_client("sqlite:///home/mlflow/mlflow.db") as client:   # an MlflowClient, globals restored after
        client.get_registered_model("prefixd-past-tense")

The tracking URI is --mlflow-uri, else $MLFLOW_TRACKING_URI, else `default_tracking_uri(home)`. Tags under
prefixd.* are ours (specs refuse them at the entry). An error that means MLflow could not be reached
(`is_unreachable`) is retried later with `exponential_backoff`; MLflow's HTTP client itself retries for
minutes by default, so an orchestrator and its worker groups set MLFLOW_HTTP_REQUEST_MAX_RETRIES and
MLFLOW_HTTP_REQUEST_TIMEOUT low (`orchestrator.config.mlflow_fail_fast`) and let this backoff work.
"""

from __future__ import annotations

import argparse
import math
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from orchestrator.config import default_tracking_uri, mlflow_database_uri

TAG = "prefixd."
JOB_TAG = "prefixd.job_id"
TASK_TAG = "prefixd.task"
BASE_TAG = "prefixd.base_model"
SHA_TAG = "prefixd.base_model_sha256"
MODEL_ID_TAG = "prefixd.model_id"
ERROR_TAG = "prefixd.error"  # on the run of a failed job: why it failed
METRIC_TAG = "prefixd.metric."
REASON_TAG = "prefixd.champion_reason"
DECISION_TAG = "prefixd.champion_decision"  # "promote" | "keep": written before the alias moves
OWNER_TAG = "prefixd.owner"  # on a registered model: the tenant that created it
LOCAL_TENANT = "local"  # orchestrator.tenants.LOCAL_TENANT: jobs without a tenant
CHAMPION = "champion"
LATEST = "latest"
MODEL_NAME = "model"  # the logged pyfunc model's name within the run
ALIAS_PATTERN = r"^[A-Za-z0-9_-]{1,255}$"  # MLflow's rule; 'latest' is built in, 'v<digits>' is reserved


def tenant_of(job) -> str:
    """The tenant a job acts for: its own, or the local admin's for a job from before tenants."""
    return getattr(job, "tenant", None) or LOCAL_TENANT


class RegistryError(ValueError):
    """Bad input to a lookup or registration: names the task, model, alias, version or file."""


# ---------------------------------------------------------------------------------------------------
# Tracking URIs and the MLflow client


def tracking_uri_from_args(args: argparse.Namespace) -> str:
    """`--mlflow-uri`, else $MLFLOW_TRACKING_URI, else the embedded default under `--home` /
    $PREFIXD_HOME / ~/.prefixd (the CLI's home)."""
    uri = getattr(args, "mlflow_uri", None) or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    from orchestrator.config import DEFAULT_HOME, HOME_ENV

    home = getattr(args, "home", None) or os.environ.get(HOME_ENV) or DEFAULT_HOME
    return default_tracking_uri(home)


def sqlite_db(uri: str) -> Path | None:
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


_GLOBALS = threading.Condition()  # guards MLflow's process-wide URIs while `mlflow_client`s use them
_in_use: dict[str, Any] = {"uri": None, "users": 0, "saved": None}


@contextmanager
def mlflow_client(uri: str) -> Iterator[Any]:
    """An MlflowClient for `uri`, with MLflow's process-wide tracking and registry URIs pointed at it
    meanwhile: the fluent calls (pyfunc.log_model, the models:/ resolver, and the sqlite registry's own
    lookup of a logged model) read those globals. Threads of one process using the same URI share them; a
    thread wanting another URI waits until the last user of the current one is done (an API server and an
    orchestrator in one process would otherwise point each other's calls at the wrong store). When the
    last user leaves, both globals and their environment variables are put back exactly as they were."""
    import mlflow

    db = sqlite_db(uri)
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
    with _GLOBALS:
        while _in_use["users"] and _in_use["uri"] != uri:
            _GLOBALS.wait()
        if not _in_use["users"]:
            _in_use["uri"], _in_use["saved"] = uri, _point_globals_at(uri)
        _in_use["users"] += 1
    try:
        yield mlflow.MlflowClient(tracking_uri=uri, registry_uri=uri)
    finally:
        with _GLOBALS:
            _in_use["users"] -= 1
            if not _in_use["users"]:
                _restore_globals(_in_use["saved"])
                _in_use["uri"] = _in_use["saved"] = None
                _GLOBALS.notify_all()


def _point_globals_at(uri: str) -> tuple:
    """Point MLflow's tracking and registry URIs at `uri`; returns what they were."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    saved = (
        tracking_utils._tracking_uri,
        registry_utils._registry_uri,
        os.environ.get("MLFLOW_TRACKING_URI"),
        os.environ.get("MLFLOW_REGISTRY_URI"),
    )
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return saved


def _restore_globals(saved: tuple) -> None:
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_utils

    mlflow.set_tracking_uri(saved[0])
    registry_utils._registry_uri = saved[1]
    for key, value in (("MLFLOW_TRACKING_URI", saved[2]), ("MLFLOW_REGISTRY_URI", saved[3])):
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


_prepared: set[str] = set()
_PREPARING = threading.Lock()


def prepare_tracking_store(uri: str) -> None:
    """Set up the MLflow database at `uri` now, once per process and URI (no-op for a tracking server,
    which sets up its own). MLflow's first opener of a database creates its tables in many steps, and a
    process killed midway (a worker group's live run on a node that dies) leaves a database that no one can
    open again ("table ... already exists"); so the orchestrator does it before any group starts, and the
    API server at start. Raises what MLflow raises (the caller logs it and tries again later)."""
    if not mlflow_database_uri(uri):
        return
    with _PREPARING:
        if uri in _prepared:
            return
        with mlflow_client(uri) as client:
            client.search_experiments(max_results=1)  # the tracking tables
            client.search_registered_models(max_results=1)  # the registry's
        _prepared.add(uri)


def quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def not_found(e: Exception) -> bool:
    return getattr(e, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND")


def registered_model(client, name: str):
    """The registered model `name`, or None when there is none (or `name` is no valid model name)."""
    try:
        return client.get_registered_model(name)
    except Exception as e:
        if not_found(e) or getattr(e, "error_code", None) == "INVALID_PARAMETER_VALUE":
            return None
        raise


def already_exists(e: Exception) -> bool:
    return getattr(e, "error_code", None) in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


def metric_of(mv, metric: str) -> float | None:
    """A version's final `metric` from its prefixd.metric.<name> tag; None when missing or not finite."""
    raw = (mv.tags or {}).get(METRIC_TAG + metric)
    try:
        value = float(raw) if raw is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None


# ---------------------------------------------------------------------------------------------------
# Outages


def exponential_backoff(attempt: int, *, base_s: float = 30.0, cap_s: float = 3600.0) -> float:
    """Seconds to wait after the `attempt`-th failed attempt (1, 2, ...): 30, 60, 120, ... capped at 1 h."""
    return min(cap_s, base_s * 2 ** max(attempt - 1, 0))


def is_unreachable(e: BaseException) -> bool:
    """Whether an error means MLflow could not be reached (rather than refused the request)."""
    import requests
    import urllib3

    transport = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.ChunkedEncodingError,
        urllib3.exceptions.HTTPError,
        ConnectionError,
        TimeoutError,
    )
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, transport):
            return True
        response = getattr(e, "response", None)
        if isinstance(e, requests.exceptions.HTTPError) and response is not None and response.status_code >= 500:
            return True
        message = str(e)
        if message.startswith("API request to ") and " failed with " in message:
            return True
        if getattr(e, "error_code", None) in ("TEMPORARILY_UNAVAILABLE",) or "database is locked" in message:
            return True
        e = e.__cause__ or e.__context__
    return False
