#!/usr/bin/env bash
# The compose stack's one-shot `setup` service: `avatar-batch setup` waits for the Prefect API, creates the work
# pool `avatar-render` if missing, registers the deployments of prefect.yaml (idempotent) and the zombie-run
# automation. This script only names what it does and exits with that command's code.
set -euo pipefail

cd "${AVATAR_BATCH_HOME:-/srv/avatar-batch}"
echo "register: avatar-batch setup against ${PREFECT_API_URL:?PREFECT_API_URL must name the Prefect API}"

status=0
avatar-batch setup --wait-seconds 120 || status=$?
if [ "$status" -eq 0 ]; then
  echo "register: done"
else
  echo "register: avatar-batch setup failed with exit code $status" >&2
fi
exit "$status"
