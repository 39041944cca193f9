#!/usr/bin/env bash
# GKE TPU runs: through XPK (single or multi-slice), or a plain JobSet (launch/gke_jobset.yaml) with kubectl.
#
#   export CLUSTER=my-cluster ZONE=us-west4-a PROJECT=my-project IMAGE=us-docker.pkg.dev/P/repo/perflow:latest
#   export TPU_TYPE=v5litepod-256 NUM_SLICES=2 WORKLOAD=perflow-sd15
#   launch/gke_xpk.sh xpk python -m perflow_jax.train --config=configs/sd15.py --workdir=gs://BUCKET/runs/sd15
#   launch/gke_xpk.sh apply python -m perflow_jax.train ...   # one slice, kubectl + gke_jobset.yaml
#   launch/gke_xpk.sh logs | delete
#
# The image holds this repository installed with `pip install 'jax[tpu]' -e .` (any Python 3.11+ base image).
# Checkpoints and TensorBoard go to the gs:// workdir (orbax and tensorboardX write gs:// paths directly), so a
# restarted workload resumes where the last one stopped.
set -euo pipefail

: "${WORKLOAD:?set WORKLOAD (the job name)}"
: "${IMAGE:?set IMAGE (a container image with perflow_jax and jax[tpu] installed)}"
CLUSTER="${CLUSTER:-}"
ZONE="${ZONE:-}"
PROJECT="${PROJECT:-}"
TPU_TYPE="${TPU_TYPE:-v5litepod-64}"
NUM_SLICES="${NUM_SLICES:-1}"
MAX_RESTARTS="${MAX_RESTARTS:-3}"
# apply only: the slice's shape as GKE names it (v5e 64 chips: 8x8 topology, 16 hosts of 4 chips).
GKE_ACCELERATOR="${GKE_ACCELERATOR:-tpu-v5-lite-podslice}"
TPU_TOPOLOGY="${TPU_TOPOLOGY:-8x8}"
NUM_HOSTS="${NUM_HOSTS:-16}"
CHIPS_PER_HOST="${CHIPS_PER_HOST:-4}"

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

require_command() {
  if [[ $# -eq 0 ]]; then
    echo "usage: $0 {xpk|apply} COMMAND [ARGS...]" >&2
    exit 2
  fi
}

cmd_xpk() {
  require_command "$@"
  : "${CLUSTER:?set CLUSTER (the GKE cluster XPK created)}"
  xpk workload create --cluster="${CLUSTER}" --project="${PROJECT}" --zone="${ZONE}" \
    --workload="${WORKLOAD}" --docker-image="${IMAGE}" --tpu-type="${TPU_TYPE}" \
    --num-slices="${NUM_SLICES}" --max-restarts="${MAX_RESTARTS}" --command="$*"
}

cmd_apply() {
  require_command "$@"
  if [[ "${NUM_SLICES}" != "1" ]]; then
    echo "apply runs one slice; use '$0 xpk' for NUM_SLICES=${NUM_SLICES} (it adds the multi-slice settings)." >&2
    exit 2
  fi
  RUN_COMMAND="$*" WORKLOAD="${WORKLOAD}" IMAGE="${IMAGE}" MAX_RESTARTS="${MAX_RESTARTS}" \
    GKE_ACCELERATOR="${GKE_ACCELERATOR}" TPU_TOPOLOGY="${TPU_TOPOLOGY}" NUM_HOSTS="${NUM_HOSTS}" \
    CHIPS_PER_HOST="${CHIPS_PER_HOST}" envsubst < "${HERE}/gke_jobset.yaml" | kubectl apply -f -
}

cmd_logs() {
  # Process 0 writes the run's logs; the other hosts only report errors.
  kubectl logs -f "jobs/${WORKLOAD}-slice-0" --all-containers=true
}

cmd_delete() {
  if [[ -n "${CLUSTER}" ]]; then
    xpk workload delete --cluster="${CLUSTER}" --project="${PROJECT}" --zone="${ZONE}" --workload="${WORKLOAD}"
  else
    kubectl delete jobset "${WORKLOAD}"
  fi
}

main() {
  local sub="${1:-}"
  shift || true
  case "${sub}" in
    xpk) cmd_xpk "$@" ;;
    apply) cmd_apply "$@" ;;
    logs) cmd_logs ;;
    delete) cmd_delete ;;
    *)
      echo "usage: $0 {xpk COMMAND...|apply COMMAND...|logs|delete}" >&2
      exit 2
      ;;
  esac
}

main "$@"
