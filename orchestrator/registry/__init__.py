"""Jobs into MLflow, and lookups of what was registered: one run and one version per job.

    run_id = log_job(uri, job, spec, result_dir)               # tracking only          (tracking.py)
    name, version = register_job(uri, job, spec, result_dir)   # run + model + version  (registration.py)
    registered = register_pending(store, uri)                  # the orchestrator's loop, with backoff
    close_ended_runs(store.list(state="failed"), uri, handled) # their runs ended with the jobs
    lookup(uri, "past-tense")                                  # the champion's version (lookup.py)

Modules: client.py (tag names, RegistryError, the tracking URI, the MLflow client, outages), tracking.py
(one run per job; `orchestrator.live_runs` feeds it while the job trains), registration.py (versions,
ownership, the champion, the loop), lookup.py (lookups, search, download). Generation from registered prefixes is `orchestrator.generation`.
"""

from orchestrator.config import default_tracking_uri
from orchestrator.registry.client import (
    CHAMPION,
    LATEST,
    OWNER_TAG,
    RegistryError,
    exponential_backoff,
    is_unreachable,
    prepare_tracking_store,
    tracking_uri_from_args,
)
from orchestrator.registry.lookup import check_alias, download, lookup, search_models
from orchestrator.registry.registration import close_ended_runs, model_owner, register_job, register_pending
from orchestrator.registry.tracking import base_model_sha256, experiment_name, experiment_owner, log_job

__all__ = [
    "CHAMPION",
    "LATEST",
    "OWNER_TAG",
    "RegistryError",
    "base_model_sha256",
    "check_alias",
    "close_ended_runs",
    "default_tracking_uri",
    "download",
    "experiment_name",
    "experiment_owner",
    "exponential_backoff",
    "is_unreachable",
    "log_job",
    "lookup",
    "model_owner",
    "prepare_tracking_store",
    "register_job",
    "register_pending",
    "search_models",
    "tracking_uri_from_args",
]
