#!/usr/bin/env bash
# Runs COMMAND until it finishes: restarts it after exit status 75 (the trainer saved a checkpoint after SIGTERM
# or a maintenance event: perflow_jax.preemption.PREEMPTED_EXIT_CODE), stops on 0 or any other status and exits
# with that status. `launch/tpu_pod.sh run` starts it (under nohup) on every TPU VM worker; it works anywhere.
#
#   launch/restart_loop.sh python -m perflow_jax.train --config=... --workdir=...
#
# Environment:
#   STOP_FILE      when this file exists the loop starts nothing more (default ~/perflow_run.stop)
#   PID_FILE       the running COMMAND's pid, rewritten at every (re)start (default ~/perflow_run.pid)
#   RESTART_EXIT_CODE (75), MAX_RESTARTS (100), RESTART_DELAY seconds between runs (10)
# Stopping: create STOP_FILE, then SIGTERM the pid in PID_FILE (the trainer saves and exits 75; the loop sees the
# stop file and exits). SIGTERM/SIGINT to the loop itself does both. SIGKILL instead of SIGTERM: stop without
# saving (the run resumes from its last periodic checkpoint).
set -uo pipefail

STOP_FILE="${STOP_FILE:-${HOME}/perflow_run.stop}"
PID_FILE="${PID_FILE:-${HOME}/perflow_run.pid}"
RESTART_EXIT_CODE="${RESTART_EXIT_CODE:-75}"
MAX_RESTARTS="${MAX_RESTARTS:-100}"
RESTART_DELAY="${RESTART_DELAY:-10}"

if [[ $# -eq 0 ]]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi

log() {
  echo "[restart_loop $(date -u +%Y-%m-%dT%H:%M:%SZ) $(hostname)] $*"
}

child=""
on_signal() {
  # Stop for good, and pass the signal on: the trainer saves a checkpoint on SIGTERM.
  touch "${STOP_FILE}"
  if [[ -n "${child}" ]]; then
    kill -TERM "${child}" 2>/dev/null || true
  fi
}
trap on_signal TERM INT

wait_child() {
  # A trapped signal interrupts `wait` (status > 128) while the child still runs: wait again.
  local rc
  while true; do
    rc=0
    wait "${child}" || rc=$?
    if ((rc > 128)) && kill -0 "${child}" 2>/dev/null; then
      continue
    fi
    return "${rc}"
  done
}

restarts=0
while true; do
  if [[ -e "${STOP_FILE}" ]]; then
    log "stop file ${STOP_FILE} exists: not starting"
    exit 0
  fi
  log "start (restart ${restarts}/${MAX_RESTARTS}): $*"
  "$@" &
  child=$!
  echo "${child}" >"${PID_FILE}"
  # `stop` may have read the previous pid just before this start: look at the stop file once more.
  if [[ -e "${STOP_FILE}" ]]; then
    kill -TERM "${child}" 2>/dev/null || true
  fi
  status=0
  wait_child || status=$?
  child=""
  rm -f "${PID_FILE}"  # a later `stop` must not signal whatever process gets this pid next
  if ((status != RESTART_EXIT_CODE)); then
    log "exit status ${status}: done"
    exit "${status}"
  fi
  if [[ -e "${STOP_FILE}" ]]; then
    log "exit status ${status} (checkpoint saved) and stop file ${STOP_FILE}: stopped"
    exit "${status}"
  fi
  if ((restarts >= MAX_RESTARTS)); then
    log "exit status ${status}, but ${MAX_RESTARTS} restarts already: giving up"
    exit "${status}"
  fi
  restarts=$((restarts + 1))
  log "exit status ${status} (preempted, checkpoint saved): restarting in ${RESTART_DELAY}s"
  sleep "${RESTART_DELAY}"
done
