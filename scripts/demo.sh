#!/usr/bin/env bash
# The README's first command: install what is missing, build, bring up the
# two-host NIC-less lab, run the main scenario, print what happened, and take
# the lab down again (also on failure).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
B=target/release
trap '$B/dsanctl lab down >/dev/null 2>&1 || true' EXIT
$B/dsanctl lab down >/dev/null

echo
echo "== 1. the lab: two hosts (network namespaces joined by a veth), one dsand each on DPDK net_af_packet"
$B/dsanctl lab up --hosts 2 --idle adaptive
echo
echo "== 2. h0 resolves h1's SAN address and sends 10000 echo frames through both dataplanes"
$B/dsanctl lab exec h0 -- $B/dsanctl ping 198.18.0.2 --count 10000
echo
echo "== 3. what h1's dataplane counted"
$B/dsanctl lab exec h1 -- $B/dsanctl status
echo
echo "== 4. the same from h1's Prometheus endpoint (root namespace)"
curl -s http://127.0.0.1:19451/metrics 2>/dev/null | grep -E '^dsan_(san_frames_received_total|port_rx_packets_total|lcore_polls_total)' \
  || python3 -c 'import urllib.request;print("".join(l for l in urllib.request.urlopen("http://127.0.0.1:19451/metrics").read().decode().splitlines(True) if l.startswith(("dsan_san_frames_received","dsan_port_rx","dsan_lcore_polls"))))'
echo
echo "== 5. lab down"
$B/dsanctl lab down
trap - EXIT
