#!/usr/bin/env bash
# A two-node Ray cluster on this machine (a head and one worker node), for trying
# `ee4d submit` before a real cluster:
#   cluster/local.sh start [CPUS_PER_NODE]   default 1 CPU per node; Jobs API on http://127.0.0.1:8265
#   cluster/local.sh status
#   cluster/local.sh stop                    stops this cluster's processes, no other Ray
# Ports: EE4D_RAY_PORT (default 6379) and EE4D_DASHBOARD_PORT (default 8265).
# Token authentication is on: `start` creates ~/.ray/auth_token when there is none, and the
# worker node and every client (ee4d submit / status / logs, ray job ...) run with
# RAY_AUTH_MODE=token and find the token there.
set -euo pipefail
export RAY_AUTH_MODE=token
port=${EE4D_RAY_PORT:-6379}
dashboard=${EE4D_DASHBOARD_PORT:-8265}
# Each node keeps its sockets, logs and unpacked job files under its own folder; `stop` ends
# the processes whose command lines name these folders, and nothing else.
head_dir="${TMPDIR:-/tmp}/ray-ee4d-head-$port"
worker_dir="${TMPDIR:-/tmp}/ray-ee4d-worker-$port"

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
}

ours() {
    # The processes naming the folders (or, the Ray Client server, the head's port), and their
    # descendants (workers rename themselves).
    local pids all=""
    pids=$(pgrep -f -- "$head_dir|$worker_dir|ray.util.client.server --address=[^ ]*:$port " || true)
    while [ -n "$pids" ]; do
        all="$all $pids"
        pids=$(for p in $pids; do pgrep -P "$p" || true; done)
    done
    echo $all
}

stop() {
    local pids
    pids=$(ours)
    [ -z "$pids" ] && { echo "no cluster of ours on port $port"; return 0; }
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 20); do
        [ -z "$(ours)" ] && break
        sleep 0.5
    done
    pids=$(ours)
    [ -n "$pids" ] && kill -KILL $pids 2>/dev/null || true
    # A later `ray.init()` must not find this cluster's address and wait for it.
    for f in /tmp/ray/ray_current_cluster "$head_dir/ray_current_cluster"; do
        if [ -f "$f" ] && grep -q ":$port\$" "$f"; then rm -f "$f"; fi
    done
    echo "stopped the cluster on port $port"
}

free_port() {
    python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

ready() {
    # The Jobs API answers and both nodes are alive.
    python - "$port" "$dashboard" <<'PY'
import sys

import ray
from ray.job_submission import JobSubmissionClient

port, dashboard = sys.argv[1:]
try:
    JobSubmissionClient(f"http://127.0.0.1:{dashboard}").list_jobs()
    ray.init(address=f"127.0.0.1:{port}", log_to_driver=False, logging_level="ERROR")
    alive = sum(n["Alive"] for n in ray.nodes())
except Exception as e:
    print(f"not ready: {type(e).__name__}: {e}", file=sys.stderr)
    sys.exit(1)
print(f"{alive} node(s) alive", file=sys.stderr)
sys.exit(0 if alive >= 2 else 1)
PY
}

case "${1:-}" in
    start)
        cpus=${2:-1}
        if [ -n "$(ours)" ]; then
            echo "a cluster of ours is already running on port $port (cluster/local.sh stop first)" >&2
            exit 1
        fi
        token="$HOME/.ray/auth_token"
        if [ -z "${RAY_AUTH_TOKEN:-}" ] && [ ! -s "$token" ]; then
            ray get-auth-token --generate >/dev/null
            echo "created the authentication token $token (clients on this machine read it there)"
        fi
        # Each node's dashboard agent (which runs submitted jobs) on a free port: the default
        # one is taken by the other node, or by any other Ray on this machine.
        ray start --head --port "$port" --dashboard-host 127.0.0.1 --dashboard-port "$dashboard" \
            --dashboard-agent-listen-port "$(free_port)" --num-cpus "$cpus" --temp-dir "$head_dir" \
            --disable-usage-stats
        ray start --address "127.0.0.1:$port" --num-cpus "$cpus" --temp-dir "$worker_dir" \
            --dashboard-agent-listen-port "$(free_port)"
        # The Jobs API and the worker node come up a little after `ray start` returns.
        for _ in $(seq 60); do
            if ready 2>/tmp/ee4d-local-ready-$port.log; then
                rm -f /tmp/ee4d-local-ready-$port.log
                echo "two-node cluster up. Submit with:"
                echo "  RAY_AUTH_MODE=token ee4d submit jobs/demo.yaml --address http://127.0.0.1:$dashboard --wait"
                exit 0
            fi
            sleep 1
        done
        echo "the cluster did not come up within 60 s: $(tail -n 1 /tmp/ee4d-local-ready-$port.log)" >&2
        echo "logs: $head_dir/session_latest/logs, $worker_dir/session_latest/logs" >&2
        stop >&2
        exit 1
        ;;
    status)
        ray status --address "127.0.0.1:$port"
        ;;
    stop)
        stop
        ;;
    -h|--help|help)
        usage
        ;;
    *)
        usage >&2
        exit 2
        ;;
esac
