#!/usr/bin/env bash
# The guide's lab path (docs/deploy.md, "On the NIC-less lab"), step by step,
# on a machine without a DPDK NIC. Leaves nothing behind. Run as root from the
# repository root after scripts/setup.sh.
set -euo pipefail
B=${B:-target/release}
NS=dsan-walk
cleanup() {
  [ -n "${PID:-}" ] && kill "$PID" 2>/dev/null && wait "$PID" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  ip netns del "$NS-peer" 2>/dev/null || true
  rm -rf /run/dsan/walk /var/run/dpdk/dsand-h0
}
trap cleanup EXIT
cleanup

echo "step 1: a namespace with a veth whose end is called san0, as the example config expects"
ip netns add "$NS"
ip netns add "$NS-peer"
ip -n "$NS" link add san0 type veth peer name san0 netns "$NS-peer"
ip -n "$NS" addr add 198.18.0.1/24 dev san0
ip -n "$NS" link set san0 up
ip -n "$NS-peer" link set san0 up

echo "step 2: dsand --check, the first step on every host"
mkdir -p /run/dsan/walk
# --netns: dsand enters the namespace itself, after binding its metrics
# endpoint where it was started (here the root namespace's loopback).
"$B/dsand" --check --config deploy/examples/lab-af_packet.toml --netns "$NS" \
  --control-socket /run/dsan/walk/dsand.sock --metrics-addr 127.0.0.1:19470

echo "step 3: start dsand with the example configuration"
"$B/dsand" --config deploy/examples/lab-af_packet.toml --netns "$NS" \
  --control-socket /run/dsan/walk/dsand.sock --metrics-addr 127.0.0.1:19470 > /run/dsan/walk/dsand.log 2>&1 &
PID=$!
for _ in $(seq 100); do
  "$B/dsanctl" --socket /run/dsan/walk/dsand.sock status > /dev/null 2>&1 && break
  sleep 0.1
done

echo "step 4: dsanctl status"
"$B/dsanctl" --socket /run/dsan/walk/dsand.sock status

echo "step 5: the Prometheus endpoint, checked with promtool"
curl -sf http://127.0.0.1:19470/metrics | promtool check metrics

echo "step 6: DPDK telemetry, with DPDK's own client"
echo "/dsan/listeners" | dpdk-telemetry.py -f dsand-h0 | grep -q '"/dsan/listeners"'

echo "step 7: stop (SIGTERM) and check nothing is left"
kill "$PID"
wait "$PID" || true
PID=
echo "walk-through done"
