#!/usr/bin/env bash
# Cloud TPU VM pods: create a slice, install perflow_jax on every worker, run one command on all workers,
# stream logs, stop, delete. Every worker runs the same program; jax.distributed.initialize() finds the other
# workers from the TPU environment (perflow_jax.parallel.mesh.maybe_initialize_distributed).
#
#   export TPU_NAME=perflow-v5e-64 ZONE=us-west4-a PROJECT=my-project ACCELERATOR_TYPE=v5litepod-64
#   launch/tpu_pod.sh create
#   launch/tpu_pod.sh install                      # copies this checkout to every worker, pip installs it
#   launch/tpu_pod.sh run python -m perflow_jax.train --config=configs/sd15.py --workdir=gs://BUCKET/runs/sd15 \
#       --config.model.pretrained=gs://BUCKET/models/sd15_converted
#   launch/tpu_pod.sh logs                         # worker 0's log (WORKER=all: every worker's last lines)
#   launch/tpu_pod.sh stop                         # SIGTERM: the trainer saves a checkpoint and exits
#   launch/tpu_pod.sh delete
#
# Multi-slice (several slices over DCN): see launch/README.md (queued resources with --node-count; the same
# `run` then targets every slice through QR_NAME).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME (the TPU VM / slice name)}"
: "${ZONE:?set ZONE (e.g. us-west4-a)}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v5litepod-64}"
RUNTIME_VERSION="${RUNTIME_VERSION:-v2-alpha-tpuv5-lite}"
REMOTE_DIR="${REMOTE_DIR:-perflow_jax}"
LOG_FILE="${LOG_FILE:-perflow_run.log}"
PID_FILE="${PID_FILE:-perflow_run.pid}"
WORKER="${WORKER:-0}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
SPOT="${SPOT:-}"  # non-empty: a spot (preemptible) slice; the trainer checkpoints on SIGTERM

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "${HERE}")"

tpu() {
  gcloud compute tpus tpu-vm "$@" --zone="${ZONE}" --project="${PROJECT}"
}

on_workers() {
  # $1: worker selector (all | 0 | 0,1,...), $2: the shell command run on each.
  tpu ssh "${TPU_NAME}" --worker="$1" --command="$2"
}

quote_args() {
  # Re-quotes "$@" so that it survives one more shell (the remote one).
  local out="" arg
  for arg in "$@"; do
    out+=" $(printf '%q' "${arg}")"
  done
  printf '%s' "${out# }"
}

cmd_create() {
  local extra=()
  if [[ -n "${SPOT}" ]]; then
    extra+=(--spot)
  fi
  tpu create "${TPU_NAME}" --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" "${extra[@]}"
}

cmd_install() {
  # Ship this checkout (tracked files) to every worker, then install it with its TPU jax.
  local archive
  archive="$(mktemp -t perflow_jax_XXXX.tar.gz)"
  git -C "${REPO_ROOT}" archive --format=tar.gz -o "${archive}" HEAD
  tpu scp "${archive}" "${TPU_NAME}:perflow_jax.tar.gz" --worker=all
  rm -f "${archive}"
  on_workers all "set -e; rm -rf ${REMOTE_DIR}; mkdir -p ${REMOTE_DIR}; tar -xzf perflow_jax.tar.gz -C ${REMOTE_DIR}; \
cd ${REMOTE_DIR}; python3 -m pip install -q -U pip; python3 -m pip install -q '${JAX_SPEC}' -e ."
}

cmd_run() {
  if [[ $# -eq 0 ]]; then
    echo "usage: $0 run COMMAND [ARGS...]  (e.g. python -m perflow_jax.train --config=...)" >&2
    exit 2
  fi
  # nohup: the run survives the ssh session; the pid file lets `stop` signal exactly this process.
  local command
  command="$(quote_args "$@")"
  on_workers all "cd ${REMOTE_DIR} && nohup ${command} > ~/${LOG_FILE} 2>&1 < /dev/null & echo \$! > ~/${PID_FILE}"
  echo "Started on all workers of ${TPU_NAME}; follow with: $0 logs"
}

cmd_logs() {
  if [[ "${WORKER}" == "all" ]]; then
    on_workers all "echo \"== \$(hostname)\"; tail -n 20 ~/${LOG_FILE}"
  else
    on_workers "${WORKER}" "tail -n 200 -f ~/${LOG_FILE}"
  fi
}

cmd_stop() {
  # SIGTERM is the preemption signal: the trainer saves a checkpoint, then exits.
  on_workers all "if [ -f ~/${PID_FILE} ]; then kill -TERM \$(cat ~/${PID_FILE}) 2>/dev/null || true; fi"
}

cmd_delete() {
  tpu delete "${TPU_NAME}" --quiet
}

main() {
  local sub="${1:-}"
  shift || true
  case "${sub}" in
    create) cmd_create ;;
    install) cmd_install ;;
    run) cmd_run "$@" ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    *)
      echo "usage: $0 {create|install|run COMMAND...|logs|stop|delete}" >&2
      exit 2
      ;;
  esac
}

main "$@"
