#!/usr/bin/env bash
# bash run_train.sh DEVICES CONFIG [key=value ...] [-v]   (DEVICES: "0", or "0,1,2,3"; --help; see README)
exec bash "$(dirname "${BASH_SOURCE[0]}")/tools/launch.sh" train "$@"
