#!/usr/bin/env bash
# bash run_infer.sh DEVICES CONFIG [key=value ...] [-v]   (DEVICES: "2", or "0,1,2,3"; --help; see README)
exec bash "$(dirname "${BASH_SOURCE[0]}")/tools/launch.sh" infer "$@"
