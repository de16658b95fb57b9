#!/usr/bin/env bash
# The README's first command: install what is missing, build, bring up the
# two-host NIC-less lab, run the main scenario, print what happened, and take
# the lab down again (also on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
B=$PWD/target/release
trap '$B/dsanctl lab down >/dev/null 2>&1 || true; pkill -f dsan-sw-probe 2>/dev/null || true' EXIT
$B/dsanctl lab down >/dev/null
probe() { # probe HOST ARGS...: dsan-sw-probe inside a lab host, attached to its daemon
  local h=$1; shift
  $B/dsanctl lab exec "$h" -- env LD_LIBRARY_PATH="$B" "$B/dsan-sw-probe" "$@"
}

echo
echo "== 1. the lab: two hosts (network namespaces joined by a veth), one dsand each on DPDK net_af_packet"
$B/dsanctl lab up --hosts 2 --idle adaptive

echo
echo "== 2. one frame through both dataplanes: h0 resolves h1's SAN address, then 2000 echo probes"
$B/dsanctl lab exec h0 -- $B/dsanctl ping 198.18.0.2 --count 2000

echo
echo "== 3. the WSD switch on h1: one listening descriptor, bound to the wildcard, for kernel TCP and SAN clients"
probe h1 listen 0.0.0.0 5000 16 2 &
sleep 0.5
$B/dsanctl lab exec h1 -- $B/dsanctl listeners
echo "   h0: a plain kernel TCP client"
$B/dsanctl lab exec h0 -- bash -c 'exec 3<>/dev/tcp/198.18.0.2/5000' && echo "   (connected over kernel TCP)"
echo "   h0: a client through the switch (198.18.0.2 is in a SAN subnet, so the SAN serves it)"
probe h0 connect 198.18.0.2 5000
wait
echo "   h0: a port nobody listens on: refused at once (ECONNREFUSED = 111), no fallback to TCP"
probe h0 connect 198.18.0.2 5999

echo "   bytes over the SAN: 64 MiB from h0 to an echo server on h1 and back, every byte compared"
probe h1 echo 0.0.0.0 5100 1 >/dev/null &
sleep 0.5
probe h0 send 198.18.0.2 5100 67108864
wait

echo
echo "== 4. what h1's daemon counted"
$B/dsanctl lab exec h1 -- $B/dsanctl stats | grep -E "^connect|^connects|^streams.bytes"

echo
echo "== 5. the same from h1's Prometheus endpoint (root namespace)"
curl -s http://127.0.0.1:19451/metrics | grep -E '^dsan_san_(connects_accepted|connects_rejected|connect_requests|bytes)' || true
$B/dsanctl lab down >/dev/null

echo
echo "== 6. a seconds-long benchmark of every scenario, dsan against kernel TCP (full runs: dsan-bench suite --help)"
$B/dsan-bench suite --smoke --idle adaptive --out bench-out/demo 2>/dev/null

echo
echo "== 7. lab down (the benchmark's files are in bench-out/demo)"
$B/dsanctl lab down
trap - EXIT
