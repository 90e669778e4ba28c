#!/usr/bin/env bash
# Shared by run_infer.sh, run_train.sh and run_zeroshot.sh: tools/launch.sh infer|train|zeroshot DEVICES CONFIG [key=value ...] [-v]
# The launching is ernievil2.launch (the same as the ernievil2-infer / ernievil2-train commands);
# this wrapper only picks the interpreter and makes a checkout work without installing.
# Environment: PYTHON (default: the repo's .venv if present, else python3), LAUNCH_LOG_DIR,
# NNODES / MASTER / NODE_RANK (several machines; see `bash run_infer.sh --help`).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -z "${VIRTUAL_ENV:-}" ] && [ -x "$here/.venv/bin/python" ]; then PYTHON="$here/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="$here/packages${PYTHONPATH:+:$PYTHONPATH}"
exec "$PYTHON" -m ernievil2.launch "$@"
