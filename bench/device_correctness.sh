#!/usr/bin/env bash
# The lent GPU's first command: correctness, about 6 minutes (BUDGET_S, default 360, is hard: a stage
# that would not fit is skipped and the summary says so). Stages: bench/device_session.py correctness --list.
#   run(command="bash bench/device_correctness.sh", carry=[".whl"], timeout_s=420)
# Prepare first, here: bash bench/device_prepare.sh. Writes $OUT/device_correctness.json and .log; exits 1 if a
# stage failed or crashed or a check failed, 3 if something was skipped, 2 if nothing could run, else 0.
# DRY=1: the same on this machine's CPU with tiny settings (no GPU; BUDGET_S default 1080).
set -u -o pipefail
. bench/device_common.sh
device_session correctness
