#!/usr/bin/env bash
# Runs an alignjax experiment on a Cloud TPU VM slice: check the bucket -> create -> install ->
# check the bucket from every worker -> run on all workers -> logs into the bucket -> delete.
# Every worker runs the same command (jax.distributed discovers the slice).
#
#   TPU_NAME=dpo-v4 ZONE=us-central2-b ACCELERATOR=v4-32 \
#   CONFIG="experiments/dpo.py:model=/gcs-fuse/qwen,loss=ipo" WORKDIR=gs://bucket/runs/dpo \
#   launch/tpu_vm.sh [--dry_run]
#
# WORKDIR must be gs://: the VM (and its disk) is deleted at the end, and on a multi-host slice each
# host would hold only its own checkpoint shards. Every result (config.json, metrics, perf,
# summary.json, TensorBoard events, plots, checkpoints) is written there by the run itself, and each
# worker's log is copied to WORKDIR/logs/ before the VM goes; rerunning resumes from the last
# checkpoint in the bucket.
#
# Environment: TPU_NAME, ZONE, ACCELERATOR (e.g. v4-32, v5litepod-16), RUNTIME (software version),
# CONFIG, WORKDIR, EXTRA_FLAGS (more --config.key=value), REPO (git URL or "copy" to scp this
# checkout), KEEP=1 to keep the VM (then a local WORKDIR is allowed), PROJECT (optional), SPOT=1 for
# spot capacity, DRY_RUN=1 (or --dry_run) to print every gcloud command, and the command each worker
# runs, without running any of them.
set -euo pipefail

[[ "${1:-}" == "--dry_run" ]] && DRY_RUN=1
DRY_RUN="${DRY_RUN:-0}"
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${ACCELERATOR:?set ACCELERATOR}"
: "${CONFIG:?set CONFIG, e.g. experiments/dpo.py:runlocal}" "${WORKDIR:?set WORKDIR}"
RUNTIME="${RUNTIME:-tpu-ubuntu2204-base}"
REPO="${REPO:-copy}"
EXTRA_FLAGS="${EXTRA_FLAGS:-}"
LOG_DIR="${LOG_DIR:-tpu_logs/${TPU_NAME}}"
GCLOUD=(gcloud compute tpus tpu-vm)
COMMON=(--zone="${ZONE}" ${PROJECT:+--project="${PROJECT}"})

if [[ "${WORKDIR}" != gs://* && "${KEEP:-0}" != "1" ]]; then
  echo "error: WORKDIR=${WORKDIR} is on the VM's disk, which is deleted at the end: use a gs:// WORKDIR (or KEEP=1)" >&2
  exit 2
fi

# Every command that touches the cloud goes through run: printed (shell-quoted) in a dry run.
run() {
  if [[ "${DRY_RUN}" == "1" ]]; then
    printf '+'
    printf ' %q' "$@"
    printf '\n'
  else
    "$@"
  fi
}
ssh_all() { run "${GCLOUD[@]}" ssh "${TPU_NAME}" "${COMMON[@]}" --worker=all --command="$1"; }

# What each worker runs, in order. pipefail: the run's exit status, not tee's.
INSTALL="cd ~/alignjax && python3 -m venv .venv && .venv/bin/pip install -q -U pip \
&& .venv/bin/pip install -q -e '.[gcs]' 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
CHECK="cd ~/alignjax && .venv/bin/python -m alignjax.storage check '${WORKDIR}'"
TRAIN="set -o pipefail; cd ~/alignjax && .venv/bin/python -m alignjax.main --config='${CONFIG}' \
--workdir='${WORKDIR}' --config.distributed.enabled=True ${EXTRA_FLAGS} 2>&1 | tee ~/run.log"
SAVE_LOG="cd ~/alignjax && .venv/bin/python -m alignjax.storage copy ~/run.log '${WORKDIR}/logs/'\$(hostname).log"

if [[ "${DRY_RUN}" == "1" ]]; then
  printf 'worker command: %s\n' "${CHECK}" "${TRAIN}" "${SAVE_LOG}"
fi

# Before paying for a VM: the bucket is reachable with this machine's credentials.
if [[ "${WORKDIR}" == gs://* ]]; then
  BUCKET="${WORKDIR#gs://}"
  run gcloud storage ls --buckets "gs://${BUCKET%%/*}"
fi

cleanup() {
  if [[ "${KEEP:-0}" != "1" ]]; then
    echo "deleting ${TPU_NAME}"
    run "${GCLOUD[@]}" delete "${TPU_NAME}" "${COMMON[@]}" --quiet || true
  fi
}
trap cleanup EXIT

echo "creating ${TPU_NAME} (${ACCELERATOR}, ${RUNTIME})"
run "${GCLOUD[@]}" create "${TPU_NAME}" "${COMMON[@]}" --accelerator-type="${ACCELERATOR}" \
  --version="${RUNTIME}" ${SPOT:+--spot}

if [[ "${REPO}" == "copy" ]]; then
  run tar czf /tmp/alignjax.tgz --exclude=.venv --exclude=workdirs --exclude=.git .
  run "${GCLOUD[@]}" scp /tmp/alignjax.tgz "${TPU_NAME}:~/alignjax.tgz" "${COMMON[@]}" --worker=all
  ssh_all "mkdir -p ~/alignjax && tar xzf ~/alignjax.tgz -C ~/alignjax"
else
  ssh_all "git clone ${REPO} ~/alignjax"
fi

ssh_all "${INSTALL}"
# With the VM's own credentials, from every worker: a probe object written and deleted.
ssh_all "${CHECK}"
ssh_all "${TRAIN}" || STATUS=$?
# The run has written its results to the bucket before exiting (checkpoints are committed and
# metrics flushed on exit); the logs follow, so nothing is left only on the VM.
if [[ "${WORKDIR}" == gs://* ]]; then
  ssh_all "${SAVE_LOG}" || true
  run mkdir -p "${LOG_DIR}"
  run gcloud storage cp "${WORKDIR}/logs/*" "${LOG_DIR}/" || true
  echo "results in ${WORKDIR}, logs in ${WORKDIR}/logs and ${LOG_DIR}"
fi
exit "${STATUS:-0}"
