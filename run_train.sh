#!/usr/bin/env bash
# bash run_train.sh DEVICES CONFIG.yaml [key=value ...]   (DEVICES: "0", or "0,1,2,3"; see README)
exec bash "$(dirname "${BASH_SOURCE[0]}")/tools/launch.sh" run_train.py "$@"
