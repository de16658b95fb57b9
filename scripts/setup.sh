#!/usr/bin/env bash
# Installs the Debian packages dsan needs (only those missing) and builds the
# workspace in release mode. Idempotent; needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

# prometheus: promtool and a real server for the metrics tests; tshark: the
# Wireshark dissector's test; python3-venv: the benchmark's plot and .hlog reader.
# systemd: systemd-analyze verify on the unit; gcc: the C examples and tests.
# nginx, redis, iperf3, wrk, sockperf, postgresql, memcached, socat: unmodified
# programs the LD_PRELOAD tests
# and bench/apps.sh run
# over the SAN (their binaries only: the tests start them in lab namespaces
# with their own minimal configurations; no service is started).
PKGS=(dpdk dpdk-dev libdpdk-dev pkg-config clang libclang-dev gcc libc6-dev iproute2 procps util-linux python3 python3-venv curl prometheus tshark systemd nginx-light redis-server redis-tools iperf3 wrk sockperf postgresql-15 memcached socat)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  # Install without starting services (Debian's prometheus, nginx, redis, postgresql and memcached
  # packages would start servers on the machine): a temporary policy-rc.d
  # refuses service starts.
  policy=/usr/sbin/policy-rc.d
  own_policy=0
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' > "$policy" && chmod +x "$policy" && own_policy=1
  fi
  # tshark: do not ask whether non-root users may capture.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | debconf-set-selections
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  if [ "$own_policy" = 1 ]; then rm -f "$policy"; fi
fi
# Python for the benchmark's plot and the independent .hlog reader.
if ! .venv/bin/python -c "import hdrh, matplotlib" 2>/dev/null; then
  echo "setup: creating .venv (hdrhistogram, matplotlib)"
  python3 -m venv .venv
  .venv/bin/pip install -q hdrhistogram matplotlib
fi
echo "setup: DPDK $(pkg-config --modversion libdpdk)"
echo "setup: building (cargo build --release --workspace)"
cargo build --release --workspace --quiet
echo "setup: built target/release/{dsand,dsanctl,dsan-bench}"
