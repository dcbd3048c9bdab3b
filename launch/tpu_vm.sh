#!/usr/bin/env bash
# Runs an alignjax experiment on a Cloud TPU VM slice: create -> install -> run on all workers ->
# collect logs -> delete. Every worker runs the same command (jax.distributed discovers the slice).
#
#   TPU_NAME=dpo-v4 ZONE=us-central2-b ACCELERATOR=v4-32 \
#   CONFIG="experiments/dpo.py:model=/gcs-fuse/qwen,loss=ipo" WORKDIR=gs://bucket/runs/dpo \
#   launch/tpu_vm.sh
#
# Environment: TPU_NAME, ZONE, ACCELERATOR (e.g. v4-32, v5litepod-16), RUNTIME (software version),
# CONFIG, WORKDIR, EXTRA_FLAGS (more --config.key=value), REPO (git URL or "copy" to scp this
# checkout), KEEP=1 to keep the VM, PROJECT (optional), SPOT=1 for spot capacity.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR}"
: "${CONFIG:?set CONFIG, e.g. experiments/dpo.py:runlocal}" "${WORKDIR:?set WORKDIR}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
REPO="${REPO:-copy}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
LOG_DIR="${LOG_DIR:-tpu_logs/${TPU_NAME}}"
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="${ZONE}" ${PROJECT:+--project="${PROJECT}"})

cleanup() {
  if [[ "${KEEP:-0}" != "1" ]]; then
    echo "deleting ${TPU_NAME}"
    "${GCLOUD[@]}" delete "${TPU_NAME}" "${COMMON[@]}" --quiet || true
  fi
}
trap cleanup EXIT

echo "creating ${TPU_NAME} (${ACCELERATOR}, ${RUNTIME})"
"${GCLOUD[@]}" create "${TPU_NAME}" "${COMMON[@]}" --accelerator-type="${ACCELERATOR}" \
  --version="${RUNTIME}" ${SPOT:+--spot}

ssh_all() { "${GCLOUD[@]}" ssh "${TPU_NAME}" "${COMMON[@]}" --worker=all --command="$1"; }

if [[ "${REPO}" == "copy" ]]; then
  tar czf /tmp/alignjax.tgz --exclude=.venv --exclude=workdirs --exclude=.git .
  "${GCLOUD[@]}" scp /tmp/alignjax.tgz "${TPU_NAME}:~/alignjax.tgz" "${COMMON[@]}" --worker=all
  ssh_all "mkdir -p ~/alignjax && tar xzf ~/alignjax.tgz -C ~/alignjax"
else
  ssh_all "git clone ${REPO} ~/alignjax"
fi

ssh_all "cd ~/alignjax && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
  && .venv/bin/pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"

# The same command on every worker; each writes its log, collected below.
ssh_all "cd ~/alignjax && .venv/bin/python -m alignjax.main --config='${CONFIG}' --workdir='${WORKDIR}' \
  --config.distributed.enabled=True ${EXTRA_FLAGS} 2>&1 | tee ~/run.log" || STATUS=$?

mkdir -p "${LOG_DIR}"
NUM_WORKERS=$("${GCLOUD[@]}" describe "${TPU_NAME}" "${COMMON[@]}" --format='value(networkEndpoints.len())' || echo 1)
for ((w = 0; w < NUM_WORKERS; w++)); do
  "${GCLOUD[@]}" scp "${TPU_NAME}:~/run.log" "${LOG_DIR}/worker_${w}.log" "${COMMON[@]}" --worker="${w}" || true
done
echo "logs in ${LOG_DIR}"
exit "${STATUS:-0}"
