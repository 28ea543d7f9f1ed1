#!/usr/bin/env bash
# Ray head + the prefixd orchestrator and HTTP API, in one container (docker compose service
# ray-head, or the head pod of docker/kuberay/raycluster.yaml).
#
# 1. starts the Ray head (`ray start --head --block`) in the background; under KubeRay the command
#    KubeRay generated ($KUBERAY_GEN_RAY_START_CMD) is used instead, so its ports and resources hold;
# 2. waits for the GCS, then starts `prefixd serve --api ... --ray-address auto`;
# 3. when either one exits, stops the other and exits with its status, so that the container's
#    restart policy (or Kubernetes) starts both again. SIGTERM stops both cleanly.
#
# Environment (see docker/.env.example): PREFIXD_STORE_URL, MLFLOW_TRACKING_URI and
# PREFIXD_API_TOKENS are required; PREFIXD_API_HOST (0.0.0.0 inside the container),
# PREFIXD_API_PORT (8765), RAY_GCS_PORT (6379), RAY_DASHBOARD_PORT (8265), RAY_HEAD_NUM_CPUS,
# RAY_HEAD_NUM_GPUS, RAY_START_EXTRA_ARGS, PREFIXD_RAY_START_TIMEOUT (seconds, 180),
# PREFIXD_GPUS_PER_WORKER (passed as --gpus-per-worker: GPUs each training rank reserves),
# PREFIXD_STORAGE (where job folders live; prefixd reads it itself).
set -euo pipefail

: "${PREFIXD_STORE_URL:?PREFIXD_STORE_URL is not set (postgresql+psycopg://...)}"
: "${MLFLOW_TRACKING_URI:?MLFLOW_TRACKING_URI is not set}"
: "${PREFIXD_API_TOKENS:?PREFIXD_API_TOKENS is not set: the API listens beyond loopback and needs tokens}"
api_host=${PREFIXD_API_HOST:-0.0.0.0}
api_port=${PREFIXD_API_PORT:-8765}

ulimit -n 65536 2>/dev/null || true   # Ray opens many sockets; keep going where the hard limit is lower

if [[ -n "${KUBERAY_GEN_RAY_START_CMD:-}" ]]; then
  gen=${KUBERAY_GEN_RAY_START_CMD##*;}   # the ray start part, should a "ulimit ...;" come first
  eval "ray_cmd=(${gen})"
else
  ray_cmd=(ray start --head
    --port="${RAY_GCS_PORT:-6379}"
    --dashboard-host=0.0.0.0 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}"
    --disable-usage-stats)
  if [[ -n "${RAY_HEAD_NUM_CPUS:-}" ]]; then ray_cmd+=(--num-cpus="${RAY_HEAD_NUM_CPUS}"); fi
  if [[ -n "${RAY_HEAD_NUM_GPUS:-}" ]]; then ray_cmd+=(--num-gpus="${RAY_HEAD_NUM_GPUS}"); fi
  if [[ -n "${RAY_START_EXTRA_ARGS:-}" ]]; then
    read -r -a extra <<<"${RAY_START_EXTRA_ARGS}"
    ray_cmd+=("${extra[@]}")
  fi
fi
[[ " ${ray_cmd[*]} " == *" --block "* ]] || ray_cmd+=(--block)

children=()
stop_children() {
  trap - TERM INT
  local pid
  for pid in "${children[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait || true
}
trap 'echo "entrypoint-head: stopping" >&2; stop_children; exit 143' TERM INT

echo "entrypoint-head: ${ray_cmd[*]}" >&2
"${ray_cmd[@]}" &
ray_pid=$!
children+=("$ray_pid")

deadline=$((SECONDS + ${PREFIXD_RAY_START_TIMEOUT:-180}))
here=$(dirname "${BASH_SOURCE[0]}")
until python "$here/healthcheck.py" gcs 2>/dev/null; do
  if ! kill -0 "$ray_pid" 2>/dev/null; then
    rc=0; wait "$ray_pid" || rc=$?
    echo "entrypoint-head: ray start exited (status $rc) before the GCS came up" >&2
    exit $((rc == 0 ? 1 : rc))
  fi
  if ((SECONDS >= deadline)); then
    echo "entrypoint-head: the Ray GCS did not come up in ${PREFIXD_RAY_START_TIMEOUT:-180}s" >&2
    stop_children
    exit 1
  fi
  sleep 2
done

echo "entrypoint-head: Ray is up; starting the prefixd API on ${api_host}:${api_port}" >&2
serve_cmd=(prefixd serve --api --host "$api_host" --port "$api_port" --ray-address auto
  --store-url "$PREFIXD_STORE_URL" --mlflow-uri "$MLFLOW_TRACKING_URI")
if [[ -n "${PREFIXD_GPUS_PER_WORKER:-}" ]]; then serve_cmd+=(--gpus-per-worker "$PREFIXD_GPUS_PER_WORKER"); fi
"${serve_cmd[@]}" &
api_pid=$!
children+=("$api_pid")

rc=0
wait -n "$ray_pid" "$api_pid" || rc=$?
echo "entrypoint-head: $(kill -0 "$ray_pid" 2>/dev/null && echo 'prefixd serve' || echo 'ray') exited (status $rc); stopping the rest" >&2
stop_children
exit $((rc == 0 ? 1 : rc))
