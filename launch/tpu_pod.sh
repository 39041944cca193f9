#!/usr/bin/env bash
# Cloud TPU VMs: one slice (TPU_NAME), or a queued resource of one or more slices (QR_NAME, NUM_SLICES; several
# slices = multi-slice over DCN). Creates the TPU, installs this checkout into a Python >= 3.11 virtual
# environment on every worker, runs one command on every worker under a restart loop (exit status 75 =
# preempted after a checkpoint -> restart), shows logs, stops, deletes. See launch/README.md.
#
#   export TPU_NAME=perflow ZONE=us-east5-a PROJECT=my-project ACCELERATOR_TYPE=v5p-128 RUNTIME_VERSION=v2-alpha-tpuv5
#   launch/tpu_pod.sh create | status | install
#   launch/tpu_pod.sh run python -m perflow_jax.train --config=configs/sd15.py:v5p-128 --workdir=gs://B/runs/sd15
#   launch/tpu_pod.sh logs | stop | delete
#
#   QR_NAME=perflow-qr NUM_SLICES=2 ... launch/tpu_pod.sh create     # queued resource, nodes perflow-qr-0, -1
#
# DRY_RUN=1 prints every command (shell-quoted, one per line) instead of running it; nothing is contacted.
# Optional: SPOT=1, GIT_REF (HEAD: what `install` ships), PYTHON_VERSION (3.11), JAX_SPEC ('jax[tpu]'),
# WORKER (logs: 0 or all), STOP_SIGNAL (TERM: save a checkpoint; KILL: stop without saving),
# MAX_RESTARTS (100), RESTART_DELAY (10 s).
set -euo pipefail

TPU_NAME="${TPU_NAME:-}"
QR_NAME="${QR_NAME:-}"
NUM_SLICES="${NUM_SLICES:-1}"
NODE_PREFIX="${NODE_PREFIX:-${QR_NAME}}"
ZONE="${ZONE:-}"        # unset: gcloud's compute/zone
PROJECT="${PROJECT:-}"  # unset: gcloud's core/project
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-}"
RUNTIME_VERSION="${RUNTIME_VERSION:-}"
SPOT="${SPOT:-}"
GIT_REF="${GIT_REF:-HEAD}"
PYTHON_VERSION="${PYTHON_VERSION:-3.11}"
JAX_SPEC="${JAX_SPEC:-jax[tpu]}"
WORKER="${WORKER:-0}"
STOP_SIGNAL="${STOP_SIGNAL:-TERM}"
MAX_RESTARTS="${MAX_RESTARTS:-100}"
RESTART_DELAY="${RESTART_DELAY:-10}"
PREEMPTED_EXIT_CODE=75  # perflow_jax.preemption.PREEMPTED_EXIT_CODE

# On every worker, relative to the home directory.
REMOTE_DIR=perflow_jax
VENV=perflow_venv
ARCHIVE=perflow_jax.tar.gz
LOG_FILE=perflow_run.log
PID_FILE=perflow_run.pid
LOOP_PID_FILE=perflow_run.loop.pid
STOP_FILE=perflow_run.stop

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "${HERE}")"

# shellcheck source=launch/common.sh
source "${HERE}/common.sh"

scope_flags=()
if [[ -n "${ZONE}" ]]; then
  scope_flags+=(--zone="${ZONE}")
fi
if [[ -n "${PROJECT}" ]]; then
  scope_flags+=(--project="${PROJECT}")
fi

target() {
  if [[ -n "${QR_NAME}" ]]; then
    printf '%s' "${QR_NAME}"
  elif [[ -n "${TPU_NAME}" ]]; then
    printf '%s' "${TPU_NAME}"
  else
    die "set TPU_NAME (one TPU VM slice) or QR_NAME (a queued resource, NUM_SLICES slices)"
  fi
}

on_workers() {
  # $1: all (every worker of every slice) or 0 (worker 0 of slice 0 = process 0); $2: the remote shell command.
  local name
  name="$(target)"
  if [[ -n "${QR_NAME}" ]]; then
    run gcloud compute tpus queued-resources ssh "${name}" ${scope_flags[@]+"${scope_flags[@]}"} --node="$1" --worker="$1" \
      --command="$2"
  else
    run gcloud compute tpus tpu-vm ssh "${name}" ${scope_flags[@]+"${scope_flags[@]}"} --worker="$1" --command="$2"
  fi
}

copy_to_workers() {
  # $1: local file, $2: destination relative to the home directory of every worker.
  local name
  name="$(target)"
  if [[ -n "${QR_NAME}" ]]; then
    run gcloud compute tpus queued-resources scp "$1" "${name}:$2" ${scope_flags[@]+"${scope_flags[@]}"} --node=all --worker=all
  else
    run gcloud compute tpus tpu-vm scp "$1" "${name}:$2" ${scope_flags[@]+"${scope_flags[@]}"} --worker=all
  fi
}

join_commands() {
  # The arguments as one shell command line: "a; b; c".
  local joined="$1"
  shift
  local part
  for part in "$@"; do
    joined+="; ${part}"
  done
  printf '%s' "${joined}"
}

# Refuses to touch a worker whose restart loop is still running (a zombie is not running).
NOT_RUNNING="if ps -o stat= -p \"\$(cat \"\$HOME\"/${LOOP_PID_FILE} 2>/dev/null || echo 0)\" 2>/dev/null | grep -q '^[^Z]'; \
then echo \"perflow_jax is running on \$(hostname): launch/tpu_pod.sh stop first\" >&2; exit 1; fi"

cmd_create() {
  local name
  name="$(target)"
  [[ -n "${ACCELERATOR_TYPE}" ]] || die "set ACCELERATOR_TYPE (e.g. v5p-128, v5litepod-256)"
  [[ -n "${RUNTIME_VERSION}" ]] || die "set RUNTIME_VERSION (e.g. v2-alpha-tpuv5 for v5p, v2-alpha-tpuv5-lite for v5e)"
  require_int NUM_SLICES
  local extra=()
  if [[ -n "${SPOT}" ]]; then
    extra+=(--spot)
  fi
  if [[ -n "${QR_NAME}" ]]; then
    if ((NUM_SLICES > 1)); then
      extra+=(--node-count="${NUM_SLICES}" --node-prefix="${NODE_PREFIX}")
    else
      extra+=(--node-id="${NODE_PREFIX}")
    fi
    run gcloud compute tpus queued-resources create "${name}" ${scope_flags[@]+"${scope_flags[@]}"} \
      --accelerator-type="${ACCELERATOR_TYPE}" --runtime-version="${RUNTIME_VERSION}" ${extra[@]+"${extra[@]}"}
  else
    ((NUM_SLICES == 1)) || die "NUM_SLICES=${NUM_SLICES} needs a queued resource: set QR_NAME instead of TPU_NAME"
    run gcloud compute tpus tpu-vm create "${name}" ${scope_flags[@]+"${scope_flags[@]}"} \
      --accelerator-type="${ACCELERATOR_TYPE}" --version="${RUNTIME_VERSION}" ${extra[@]+"${extra[@]}"}
  fi
}

cmd_status() {
  local name
  name="$(target)"
  if [[ -n "${QR_NAME}" ]]; then
    run gcloud compute tpus queued-resources describe "${name}" ${scope_flags[@]+"${scope_flags[@]}"} --format='value(state.state)'
  else
    run gcloud compute tpus tpu-vm describe "${name}" ${scope_flags[@]+"${scope_flags[@]}"} --format='value(state)'
  fi
}

cmd_install() {
  # Ships GIT_REF of this checkout (committed files only) to every worker and installs it into a fresh Python
  # >= 3.11 virtual environment: the TPU VM images have Python 3.10, so uv (pip-installed for the user) creates
  # the environment, with the image's python3.11 if there is one, else a uv-managed CPython download.
  [[ "${PYTHON_VERSION}" =~ ^3\.[0-9]+$ ]] || die "PYTHON_VERSION is like 3.11 or 3.12, not '${PYTHON_VERSION}'"
  [[ "${JAX_SPEC}" != *[\"\$\`\\]* ]] || die "JAX_SPEC: no quotes, \$, \` or backslashes"
  local name archive
  name="$(target)"
  archive="${TMPDIR:-/tmp}/perflow_jax-${name}.tar.gz"
  run git -C "${REPO_ROOT}" archive --format=tar.gz -o "${archive}" "${GIT_REF}"
  copy_to_workers "${archive}" "${ARCHIVE}"
  run rm -f "${archive}"
  local py="\"\$HOME\"/${VENV}/bin/python"
  on_workers all "$(join_commands \
    "set -e" \
    "${NOT_RUNNING}" \
    "python3 -m pip install --user --quiet --upgrade uv" \
    "rm -rf \"\$HOME\"/${REMOTE_DIR} \"\$HOME\"/${VENV}" \
    "mkdir -p \"\$HOME\"/${REMOTE_DIR}" \
    "tar -xzf \"\$HOME\"/${ARCHIVE} -C \"\$HOME\"/${REMOTE_DIR}" \
    "python3 -m uv venv --seed --python ${PYTHON_VERSION} \"\$HOME\"/${VENV}" \
    "cd \"\$HOME\"/${REMOTE_DIR}" \
    "python3 -m uv pip install --python ${py} \"${JAX_SPEC}\" -e \".[gcp]\"" \
    "${py} -c \"import sys; assert sys.version_info >= (3, 11), sys.version\"" \
    "echo \"installed on \$(hostname): \$(${py} --version)\"")"
}

cmd_run() {
  [[ $# -gt 0 ]] || die "usage: $0 run COMMAND [ARGS...]  (e.g. python -m perflow_jax.train --config=...)"
  require_int MAX_RESTARTS
  require_int RESTART_DELAY
  # nohup: the loop outlives the ssh session. `cd X || exit; nohup loop & echo $!`: $! is the loop itself (a
  # backgrounded `cd && nohup ...` list would record a subshell); the loop writes the trainer's pid to PID_FILE.
  on_workers all "$(join_commands \
    "cd \"\$HOME\"/${REMOTE_DIR} || exit 1" \
    "${NOT_RUNNING}" \
    ". \"\$HOME\"/${VENV}/bin/activate || exit 1" \
    "rm -f \"\$HOME\"/${STOP_FILE}" \
    "export STOP_FILE=\"\$HOME\"/${STOP_FILE} PID_FILE=\"\$HOME\"/${PID_FILE} \
RESTART_EXIT_CODE=${PREEMPTED_EXIT_CODE} MAX_RESTARTS=${MAX_RESTARTS} RESTART_DELAY=${RESTART_DELAY}" \
    "nohup bash launch/restart_loop.sh $(shell_quote "$@") >> \"\$HOME\"/${LOG_FILE} 2>&1 < /dev/null & \
echo \$! > \"\$HOME\"/${LOOP_PID_FILE}")"
  if ! is_dry_run; then
    echo "Started on every worker of $(target); follow with: $0 logs" >&2
  fi
}

cmd_logs() {
  if [[ "${WORKER}" == "all" ]]; then
    on_workers all "echo \"== \$(hostname)\"; tail -n 20 \"\$HOME\"/${LOG_FILE}"
  else
    [[ "${WORKER}" == 0 ]] || die "WORKER is 0 (process 0, which writes the run's log) or all"
    on_workers 0 "tail -n 200 -F \"\$HOME\"/${LOG_FILE}"
  fi
}

cmd_stop() {
  # The stop file keeps the loop from restarting; STOP_SIGNAL=TERM makes the trainer save a checkpoint and exit
  # 75 (the loop then exits), STOP_SIGNAL=KILL stops it at once without saving.
  [[ "${STOP_SIGNAL}" =~ ^(TERM|KILL|INT)$ ]] || die "STOP_SIGNAL is TERM (save), KILL (no save) or INT"
  on_workers all "$(join_commands \
    "touch \"\$HOME\"/${STOP_FILE}" \
    "if [ -f \"\$HOME\"/${PID_FILE} ]; then kill -${STOP_SIGNAL} \"\$(cat \"\$HOME\"/${PID_FILE})\" 2>/dev/null || true; fi")"
}

cmd_delete() {
  local name
  name="$(target)"
  if [[ -n "${QR_NAME}" ]]; then
    # --force: delete the queued resource's TPU VMs too.
    run gcloud compute tpus queued-resources delete "${name}" ${scope_flags[@]+"${scope_flags[@]}"} --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "${name}" ${scope_flags[@]+"${scope_flags[@]}"} --quiet
  fi
}

main() {
  local sub="${1:-}"
  shift || true
  case "${sub}" in
    create) cmd_create ;;
    status) cmd_status ;;
    install) cmd_install ;;
    run) cmd_run "$@" ;;
    logs) cmd_logs ;;
    stop) cmd_stop ;;
    delete) cmd_delete ;;
    *) die "usage: $0 {create|status|install|run COMMAND...|logs|stop|delete}" ;;
  esac
}

main "$@"
