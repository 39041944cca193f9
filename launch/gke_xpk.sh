#!/usr/bin/env bash
# GKE TPU runs: build the image (launch/Dockerfile), then run through xpk (one or several slices) or as a plain
# JobSet (launch/gke_jobset.yaml, one slice) with kubectl. See launch/README.md.
#
#   export IMAGE=us-docker.pkg.dev/my-project/perflow/perflow:v1 WORKLOAD=perflow-sd15
#   launch/gke_xpk.sh build                                   # docker build + push
#   export CLUSTER=my-cluster ZONE=us-east5-a PROJECT=my-project TPU_TYPE=v5p-128 NUM_SLICES=1
#   launch/gke_xpk.sh xpk python -m perflow_jax.train --config=configs/sd15.py:v5p-128 --workdir=gs://B/runs/sd15
#   launch/gke_xpk.sh apply python -m perflow_jax.train ...   # one slice: kubectl apply of the rendered JobSet
#   launch/gke_xpk.sh render python -m perflow_jax.train ...  # print that JobSet
#   launch/gke_xpk.sh logs | delete
#
# The command's words reach the container exactly (quoted for bash -c, JSON-quoted in the YAML, `$` escaped as
# `$$` against Kubernetes' $(VAR) expansion). Restarts: exit status 75 (preemption save) restarts the workload
# (xpk: --restart-on-exit-codes=75; JobSet: podFailurePolicy + failurePolicy, see gke_jobset.yaml), up to
# MAX_RESTARTS times; 0 ends it; other codes fail it. DRY_RUN=1 prints every command instead of running it.
set -euo pipefail

WORKLOAD="${WORKLOAD:-}"
IMAGE="${IMAGE:-}"
CLUSTER="${CLUSTER:-}"
ZONE="${ZONE:-}"        # unset: xpk / gcloud defaults (compute/zone)
PROJECT="${PROJECT:-}"  # unset: xpk / gcloud defaults (core/project)
TPU_TYPE="${TPU_TYPE:-v5p-128}"
NUM_SLICES="${NUM_SLICES:-1}"
MAX_RESTARTS="${MAX_RESTARTS:-10}"
GRACE_SECONDS="${GRACE_SECONDS:-120}"  # SIGTERM -> SIGKILL: time for the preemption checkpoint
PREEMPTED_EXIT_CODE=75  # perflow_jax.preemption.PREEMPTED_EXIT_CODE
# apply/render: exit codes that restart the JobSet (75: preemption save; 128-255: killed by a signal).
RESTART_EXIT_CODES="${RESTART_EXIT_CODES:-${PREEMPTED_EXIT_CODE},128-255}"
# apply/render only: the slice as GKE names it (v5p-128: 64 chips, 4x4x4, 16 hosts of 4 chips).
GKE_ACCELERATOR="${GKE_ACCELERATOR:-tpu-v5p-slice}"
TPU_TOPOLOGY="${TPU_TOPOLOGY:-4x4x4}"
NUM_HOSTS="${NUM_HOSTS:-16}"
CHIPS_PER_HOST="${CHIPS_PER_HOST:-4}"
PIP_EXTRAS="${PIP_EXTRAS:-}"  # build: the image's setup.cfg extras (empty: the Dockerfile's default, "[gcp]")

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "${HERE}")"
# shellcheck source=launch/common.sh
source "${HERE}/common.sh"

require_printable() {
  # $1: a string for the YAML: tabs and newlines are fine, other control characters are refused.
  if [[ "$1" == *[$'\001'-$'\010'$'\013'$'\014'$'\016'-$'\037']* ]]; then
    die "control characters in: $1"
  fi
}

json_string() {
  # $1 as a JSON string, which is also a YAML double-quoted scalar (after require_printable).
  local s="$1"
  s="${s//\\/\\\\}"
  s="${s//\"/\\\"}"
  s="${s//$'\n'/\\n}"
  s="${s//$'\t'/\\t}"
  s="${s//$'\r'/\\r}"
  printf '"%s"' "${s}"
}

require_workload() {
  [[ -n "${WORKLOAD}" ]] || die "set WORKLOAD (the job name)"
  [[ "${WORKLOAD}" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "WORKLOAD must be lower-case letters, digits and '-'"
}

require_image() {
  [[ -n "${IMAGE}" ]] || die "set IMAGE (the image launch/Dockerfile builds, e.g. us-docker.pkg.dev/P/repo/perflow:v1)"
}

require_command() {
  [[ $# -gt 0 ]] || die "usage: $0 {xpk|apply|render} COMMAND [ARGS...]"
}

scope_flags=()  # --project / --zone only where set (an empty --project= would be an error)
if [[ -n "${PROJECT}" ]]; then
  scope_flags+=(--project="${PROJECT}")
fi
if [[ -n "${ZONE}" ]]; then
  scope_flags+=(--zone="${ZONE}")
fi

require_exit_codes() {
  [[ "${RESTART_EXIT_CODES}" =~ ^[0-9]{1,3}(-[0-9]{1,3})?(,[0-9]{1,3}(-[0-9]{1,3})?)*$ ]] ||
    die "RESTART_EXIT_CODES is a list of codes and ranges like 75,128-255, not '${RESTART_EXIT_CODES}'"
  local item
  local IFS=',-'
  for item in ${RESTART_EXIT_CODES}; do
    ((10#${item} >= 1 && 10#${item} <= 255)) || die "RESTART_EXIT_CODES: ${item} is not an exit code (1-255)"
  done
}

exit_code_list() {
  # "75,128-255" -> "[75, 128, 129, ..., 255]": ascending, no repeats (Kubernetes requires both).
  local item i
  local -a codes=()
  local IFS=','
  for item in ${RESTART_EXIT_CODES}; do
    if [[ "${item}" =~ ^([0-9]+)-([0-9]+)$ ]]; then
      for ((i = 10#${BASH_REMATCH[1]}; i <= 10#${BASH_REMATCH[2]}; i++)); do
        codes+=("${i}")
      done
    else
      codes+=("$((10#${item}))")
    fi
  done
  local sorted
  sorted="$(printf '%s\n' "${codes[@]}" | sort -n -u | paste -s -d, -)"
  printf '[%s]' "${sorted//,/, }"
}

cmd_build() {
  require_image
  local extra=()
  if [[ -n "${PIP_EXTRAS}" ]]; then
    extra+=(--build-arg "PIP_EXTRAS=${PIP_EXTRAS}")
  fi
  # TPU hosts are x86-64: build for linux/amd64 also on an arm64 laptop.
  run docker build --platform=linux/amd64 -f "${HERE}/Dockerfile" ${extra[@]+"${extra[@]}"} -t "${IMAGE}" "${REPO_ROOT}"
  run docker push "${IMAGE}"
}

cmd_xpk() {
  require_command "$@"
  require_workload
  require_image
  [[ -n "${CLUSTER}" ]] || die "set CLUSTER (the GKE cluster xpk created)"
  require_int NUM_SLICES
  require_int MAX_RESTARTS
  require_int GRACE_SECONDS
  run xpk workload create --cluster="${CLUSTER}" ${scope_flags[@]+"${scope_flags[@]}"} --workload="${WORKLOAD}" \
    --docker-image="${IMAGE}" --tpu-type="${TPU_TYPE}" --num-slices="${NUM_SLICES}" \
    --max-restarts="${MAX_RESTARTS}" --restart-on-exit-codes="${PREEMPTED_EXIT_CODE}" \
    --termination-grace-period-seconds="${GRACE_SECONDS}" --command="$(shell_quote "$@")"
}

yaml=""
fill() {
  # Replaces ${$1} in $yaml by $2; quoted pattern and replacement are taken literally (no globbing, no `&`).
  yaml="${yaml//"\${$1}"/"$2"}"
}

render_jobset() {
  # Prints gke_jobset.yaml with its ${...} fields filled in; "$@" is the command.
  require_command "$@"
  require_workload
  require_image
  if [[ "${NUM_SLICES}" != "1" ]]; then
    die "apply/render run one slice; use '$0 xpk' for NUM_SLICES=${NUM_SLICES} (it adds the multi-slice settings)"
  fi
  local var
  for var in MAX_RESTARTS GRACE_SECONDS NUM_HOSTS CHIPS_PER_HOST; do
    require_int "${var}"
  done
  # bash -c "exec ...": the trainer replaces the shell (it gets the pod's SIGTERM); every `$` doubled, as
  # Kubernetes expands $(VAR) in a container's command and turns `$$` into `$`.
  local command
  command="exec $(shell_quote "$@")"
  command="${command//\$/\$\$}"
  require_exit_codes
  local value
  for value in "${IMAGE}" "${GKE_ACCELERATOR}" "${TPU_TOPOLOGY}" "${command}"; do
    require_printable "${value}"
  done
  yaml="$(<"${HERE}/gke_jobset.yaml")"
  yaml="apiVersion:${yaml#*$'\n'apiVersion:}"  # without the template's header comment
  fill WORKLOAD "${WORKLOAD}"
  fill IMAGE "$(json_string "${IMAGE}")"
  fill MAX_RESTARTS "${MAX_RESTARTS}"
  fill GRACE_SECONDS "${GRACE_SECONDS}"
  fill NUM_HOSTS "${NUM_HOSTS}"
  fill CHIPS_PER_HOST "${CHIPS_PER_HOST}"
  fill GKE_ACCELERATOR "$(json_string "${GKE_ACCELERATOR}")"
  fill TPU_TOPOLOGY "$(json_string "${TPU_TOPOLOGY}")"
  fill RESTART_EXIT_CODES "$(exit_code_list)"
  fill RUN_COMMAND "$(json_string "${command}")"
  printf '%s\n' "${yaml}"
}

cmd_render() {
  render_jobset "$@"
}

cmd_apply() {
  local yaml
  yaml="$(render_jobset "$@")"
  if is_dry_run; then
    printf '%s\n' "kubectl apply -f - <<'PERFLOW_JOBSET_EOF'" "${yaml}" "PERFLOW_JOBSET_EOF"
  else
    printf '%s\n' "${yaml}" | kubectl apply -f -
  fi
}

cmd_logs() {
  # Process 0 (slice 0 = job index 0, host 0 = completion index 0) writes the run's log.
  require_workload
  run kubectl logs -f --tail=200 --all-containers=true \
    -l "jobset.sigs.k8s.io/jobset-name=${WORKLOAD},jobset.sigs.k8s.io/job-index=0,batch.kubernetes.io/job-completion-index=0"
}

cmd_delete() {
  require_workload
  if [[ -n "${CLUSTER}" ]]; then
    run xpk workload delete --cluster="${CLUSTER}" ${scope_flags[@]+"${scope_flags[@]}"} --workload="${WORKLOAD}"
  else
    run kubectl delete jobset "${WORKLOAD}"
  fi
}

main() {
  local sub="${1:-}"
  shift || true
  case "${sub}" in
    build) cmd_build ;;
    xpk) cmd_xpk "$@" ;;
    render) cmd_render "$@" ;;
    apply) cmd_apply "$@" ;;
    logs) cmd_logs ;;
    delete) cmd_delete ;;
    *) die "usage: $0 {build|xpk COMMAND...|render COMMAND...|apply COMMAND...|logs|delete}" ;;
  esac
}

main "$@"
