"""A Ray on this machine only: every address 127.0.0.1, prefixd importable by its workers.

start_local_ray(num_cpus=2)    # `prefixd run` without --ray-address, and the tests
keep_ray_on_loopback()         # before `ray.cluster_utils.Cluster(...)`, for test clusters
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import ray

_PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)  # holds jobs/, orchestrator/, workers/


def keep_ray_on_loopback() -> None:
    """Make Ray processes started from here (a local Ray, or test nodes of `ray.cluster_utils.Cluster`) use
    127.0.0.1 for every address.

    Ray turns `_node_ip_address="127.0.0.1"` into the machine's external address unless it believes it
    is on a laptop (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0). That variable is read when Ray is imported, so
    the constant is set as well; child processes (raylet, workers) inherit the variable.
    """
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start a private single-machine Ray whose every address is 127.0.0.1 (`keep_ray_on_loopback`)."""
    keep_ray_on_loopback()
    ray.init(
        address="local",  # never join a cluster named by RAY_ADDRESS by accident
        num_cpus=num_cpus,
        include_dashboard=False,
        _node_ip_address="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=False,  # workers' output would garble the progress view; it is in Ray's log files
        # Workers import prefixd from the source tree even when it is not installed.
        runtime_env={"env_vars": {"PYTHONPATH": _pythonpath()}},
    )


def _pythonpath() -> str:
    existing = os.environ.get("PYTHONPATH")
    return _PROJECT_ROOT + (os.pathsep + existing if existing else "")
