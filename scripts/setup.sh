#!/usr/bin/env bash
# Installs the Debian packages dsan needs (only those missing) and builds the
# workspace in release mode. Idempotent; needs root for apt-get.
set -euo pipefail
cd "$(dirname "$0")/.."

PKGS=(dpdk dpdk-dev libdpdk-dev pkg-config clang libclang-dev iproute2 procps util-linux python3)
missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "setup: DPDK $(pkg-config --modversion libdpdk)"
echo "setup: building (cargo build --release --workspace)"
cargo build --release --workspace --quiet
echo "setup: built target/release/{dsand,dsanctl,dsan-bench}"
