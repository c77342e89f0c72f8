#!/usr/bin/env bash
# A local two-node Ray cluster on 127.0.0.1 for development: a head plus a second node on the
# same machine, so that multi-node behaviour (node loss, task placement) can be tried without a cloud.
#
#   bash clusters/local.sh start      # head (2 CPUs) + node "wnode" (2 CPUs); dashboard on 127.0.0.1:8265
#   bash clusters/local.sh status
#   bash clusters/local.sh stop
#
# Run it with the project's venv first on PATH, or the jobs would start the system python. Token
# auth is off, because this throwaway cluster only listens on loopback.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH" RAY_AUTH_MODE=disabled
HEAD_CPUS=${HEAD_CPUS:-2}
NODE_CPUS=${NODE_CPUS:-2}
case "${1:-}" in
  start)
    ray start --head --node-ip-address 127.0.0.1 --port 6379 --dashboard-host 127.0.0.1 \
      --num-cpus "$HEAD_CPUS" --disable-usage-stats
    ray start --address 127.0.0.1:6379 --node-ip-address 127.0.0.1 --num-cpus "$NODE_CPUS" \
      --resources '{"wnode": 1}' --disable-usage-stats
    echo "submit with: RAY_AUTH_MODE=disabled ray job submit --address http://127.0.0.1:8265 --working-dir . -- metakd-ray run quickstart"
    ;;
  status) ray status --address 127.0.0.1:6379 ;;
  stop) ray stop --force ;;
  *) echo "usage: $0 start|status|stop" >&2; exit 2 ;;
esac
