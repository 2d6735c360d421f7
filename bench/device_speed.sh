#!/usr/bin/env bash
# The lent GPU's second command: speed, about 5 minutes (BUDGET_S, default 290, is hard: a stage
# that would not fit is skipped and the summary says so). Stages: bench/device_session.py speed --list.
#   run(command="bash bench/device_speed.sh", carry=[".whl"], timeout_s=360)
# Prepare first, here: bash bench/device_prepare.sh. Writes $OUT/device_speed.json and .log; exits 1 if a
# stage failed or crashed or a check failed, 3 if something was skipped, 2 if nothing could run, else 0.
# DRY=1: the same on this machine's CPU with tiny settings (no GPU; BUDGET_S default 870).
set -u -o pipefail
. bench/device_common.sh
device_session speed
