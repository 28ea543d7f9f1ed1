#!/usr/bin/env bash
# A Ray worker node: joins the head and blocks (docker compose services ray-worker and
# ray-worker-gpu, or a worker pod of docker/kuberay/raycluster.yaml, where the command KubeRay
# generated, $KUBERAY_GEN_RAY_START_CMD, is used). Ray detects the GPUs it was given.
#
# Environment: RAY_HEAD_ADDRESS (ray-head:6379), RAY_WORKER_NUM_CPUS, RAY_WORKER_NUM_GPUS,
# RAY_START_EXTRA_ARGS; RAY_AUTH_TOKEN when the cluster uses token authentication.
set -euo pipefail

ulimit -n 65536 2>/dev/null || true

if [[ -n "${KUBERAY_GEN_RAY_START_CMD:-}" ]]; then
  gen=${KUBERAY_GEN_RAY_START_CMD##*;}   # the ray start part, should a "ulimit ...;" come first
  eval "ray_cmd=(${gen})"
else
  ray_cmd=(ray start --address="${RAY_HEAD_ADDRESS:-ray-head:6379}" --disable-usage-stats)
  if [[ -n "${RAY_WORKER_NUM_CPUS:-}" ]]; then ray_cmd+=(--num-cpus="${RAY_WORKER_NUM_CPUS}"); fi
  if [[ -n "${RAY_WORKER_NUM_GPUS:-}" ]]; then ray_cmd+=(--num-gpus="${RAY_WORKER_NUM_GPUS}"); fi
  if [[ -n "${RAY_START_EXTRA_ARGS:-}" ]]; then
    read -r -a extra <<<"${RAY_START_EXTRA_ARGS}"
    ray_cmd+=("${extra[@]}")
  fi
fi
[[ " ${ray_cmd[*]} " == *" --block "* ]] || ray_cmd+=(--block)

echo "entrypoint-worker: ${ray_cmd[*]}" >&2
exec "${ray_cmd[@]}"
