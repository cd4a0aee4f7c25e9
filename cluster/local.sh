#!/usr/bin/env bash
# A two-node Ray cluster on this machine (a head and one worker node), for trying
# `ee4d submit` before a real cluster:
#   cluster/local.sh start [CPUS_PER_NODE]   default 1 CPU per node; Jobs API on http://127.0.0.1:8265
#   cluster/local.sh status
#   cluster/local.sh stop                    note: `ray stop` stops every Ray process on this machine
# Ports: EE4D_RAY_PORT (default 6379) and EE4D_DASHBOARD_PORT (default 8265).
#
# `ray start --head` turns token authentication on. The worker node and every client
# (ee4d submit / status / logs, ray job ...) must run with RAY_AUTH_MODE=token; the token
# is written to ~/.ray/auth_token, where clients on this machine find it.
set -euo pipefail
export RAY_AUTH_MODE=token
port=${EE4D_RAY_PORT:-6379}
dashboard=${EE4D_DASHBOARD_PORT:-8265}

case "${1:-}" in
    start)
        cpus=${2:-1}
        ray start --head --port "$port" --dashboard-host 127.0.0.1 --dashboard-port "$dashboard" \
            --num-cpus "$cpus" --disable-usage-stats
        # The worker node gets its own temp dir: two raylets sharing one would unpack a job's
        # working dir into the same folder, one over the other while the job imports from it.
        ray start --address "127.0.0.1:$port" --num-cpus "$cpus" --temp-dir "${TMPDIR:-/tmp}/ray-ee4d-worker-$port"
        # The Jobs API comes up a little after `ray start` returns.
        for _ in $(seq 60); do
            python - "$dashboard" <<'PY' && break
import sys
from ray.job_submission import JobSubmissionClient
try:
    JobSubmissionClient(f"http://127.0.0.1:{sys.argv[1]}").list_jobs()
except Exception:
    sys.exit(1)
PY
            sleep 1
        done
        echo "two-node cluster up. Submit with:"
        echo "  RAY_AUTH_MODE=token ee4d submit jobs/demo.yaml --address http://127.0.0.1:$dashboard --wait"
        ;;
    status)
        ray status --address "127.0.0.1:$port"
        ;;
    stop)
        ray stop
        ;;
    *)
        sed -n '2,12p' "$0"
        exit 2
        ;;
esac
