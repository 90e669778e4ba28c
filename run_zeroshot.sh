#!/usr/bin/env bash
# bash run_zeroshot.sh DEVICES CONFIG [key=value ...] --classes FILE --images TSV_OR_FOLDER [--lang zh|en]
#   [--templates FILE] [--json OUT] [-v]   (DEVICES: "0", or "0,1,2,3"; --help; see README)
exec bash "$(dirname "${BASH_SOURCE[0]}")/tools/launch.sh" zeroshot "$@"
