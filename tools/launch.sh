#!/usr/bin/env bash
# Shared launcher of run_infer.sh and run_train.sh.
#   tools/launch.sh ENTRY.py DEVICES CONFIG.yaml [key=value ...]
# DEVICES means what it means in the official script (CUDA_VISIBLE_DEVICES): "2" runs one process
# on card 2; a list "0,1,2,3" runs one process per card under paddle.distributed.launch. Without a
# GPU every listed entry is one CPU process (gloo), so "0,1" = two CPU processes.
# Environment: PYTHON (interpreter; default: the repo's .venv if present, else python3),
# LAUNCH_LOG_DIR (the launcher's logs, which dump the environment; default log/launch, git-ignored),
# MASTER / NNODES for several machines (see README).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
entry="$1"; shift
if [ $# -lt 2 ]; then
  echo "usage: $(basename "$entry" .py | sed 's/^/bash /;s/$/.sh/') DEVICES CONFIG.yaml [key=value ...]" >&2
  echo "  DEVICES: a card id (2) or a list (0,1,2,3); without a GPU each entry is one CPU process" >&2
  exit 2
fi
devices="$1"; config="$2"; shift 2
if [ -z "${PYTHON:-}" ]; then
  if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
if ! [[ "$devices" =~ ^[0-9]+(,[0-9]+)*$ ]]; then
  echo "DEVICES must be a card id or a comma-separated list of ids, got '$devices'" >&2; exit 2
fi
IFS=',' read -r -a dev_list <<< "$devices"
n=${#dev_list[@]}
export PYTHONPATH="$here/packages${PYTHONPATH:+:$PYTHONPATH}"
if [ "$n" -eq 1 ] && [ -z "${NNODES:-}" ]; then
  export CUDA_VISIBLE_DEVICES="$devices"   # as the official run_infer.sh
  exec "$PYTHON" "$here/$entry" "$config" "$@"
fi
has_gpu=$("$PYTHON" -c "import paddle; print(int(paddle.device.is_compiled_with_cuda() and paddle.device.cuda.device_count() > 0))" 2>/dev/null || echo 0)
log_dir="${LAUNCH_LOG_DIR:-log/launch}"
mkdir -p "$log_dir"
launch=("$PYTHON" -m paddle.distributed.launch --log_dir "$log_dir")
if [ -n "${NNODES:-}" ]; then launch+=(--nnodes "$NNODES" --master "${MASTER:?set MASTER=host:port for several machines}"); fi
if [ "$has_gpu" = "1" ]; then
  launch+=(--devices "$devices")
else
  launch+=(--nproc_per_node "$n")   # --devices fails without a GPU; each entry = one CPU process
fi
exec "${launch[@]}" "$here/$entry" "$config" "$@"
