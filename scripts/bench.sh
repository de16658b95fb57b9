#!/usr/bin/env bash
# Every published benchmark figure, in one command, at the checked-out commit:
#
#   scripts/bench.sh [--quick] [--allow-dirty]
#
# Builds the release binaries, then runs, each dsan against kernel TCP on
# the same lab veth with the paths alternating (3 runs by default):
#   1. dsan-bench suite      -> docs/bench/suite/   (connect, reject, rates,
#                               overload, byte streams; CPU by class)
#   2. dsan-bench data       -> docs/bench/data/    (pingpong, stream, crr at
#                               MTU 1500, 9000 and 61346; memif rows labelled)
#   3. dsan-bench connect    -> docs/bench/connect.json (command round trip)
#   4. bench/apps.sh         -> docs/bench/apps/    (redis-benchmark, wrk/nginx)
#   5. bench/hosts.py        -> docs/bench/hosts/   (idle cost, 2..128 hosts)
# and regenerates the tables of docs/benchmarks.md from that JSON
# (`dsan-bench tables --write`; the test suite checks them with --check).
# Every file records the commit and dirty flag the binaries were built
# from, the command, the machine and the steal time during its run.
#
# Refuses to run with uncommitted changes to tracked sources (the figures
# would name a commit that did not make them) unless --allow-dirty.
# --quick: fewer connects and bytes, the same shape (minutes, not tens).
# Needs root and what scripts/setup.sh installs; traffic stays in the lab's
# network namespaces (198.18.0.0/24). Takes about 10 minutes on 2 vCPUs.
set -euo pipefail
cd "$(dirname "$0")/.."
quick=0
allow_dirty=0
while (($#)); do
  case "$1" in
    --quick) quick=1; shift ;;
    --allow-dirty) allow_dirty=1; shift ;;
    -h|--help) sed -n '2,24p' "$0"; exit 0 ;;
    *) echo "bench.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [ "$allow_dirty" = 0 ] && [ -n "$(git status --porcelain --untracked-files=no -- . ':!docs/bench' ':!docs/benchmarks.md' ':!README.md')" ]; then
  echo "bench.sh: uncommitted changes to tracked files: commit them first (or --allow-dirty)" >&2
  exit 1
fi
[ "$(id -u)" = 0 ] || { echo "bench.sh: needs root (the lab's namespaces and DPDK)" >&2; exit 1; }

step=0
steps=6
say() { step=$((step + 1)); echo "== [$step/$steps] $* ($(date -u +%T))" >&2; }

say "build (release)"
cargo build --release --workspace --quiet
bin=target/release
export DSAN_PYTHON="${DSAN_PYTHON:-$PWD/.venv/bin/python}"

if [ "$quick" = 1 ]; then
  suite_args=(--count 500 --duration-ms 1000)
  data_args=(--count 4000 --bytes 134217728)
  apps_args=(--requests 50000 --duration 2)
  hosts_args=(--hosts 2,16 --count 300 --window 2)
else
  suite_args=()
  data_args=(--count 20000 --bytes 1073741824)
  apps_args=()
  hosts_args=()
fi

out=docs/bench
# The figures of earlier commits go: every file under docs/bench is this
# run's, but for the labelled comparisons of named builds (compare-*, each
# file with its build's commit), which docs/benchmarks.md quotes apart.
mkdir -p "$out"
find "$out" -mindepth 1 -maxdepth 1 ! -name 'compare-*' -exec rm -rf {} +
mkdir -p "$out/suite" "$out/data" "$out/apps" "$out/hosts"

say "suite (3 runs, paths rotated per run)"
"$bin/dsan-bench" suite --idle adaptive --repeat 3 "${suite_args[@]}" --out "$out/suite" | tee "$out/suite/table.txt"

say "byte streams (3 runs, alternating; MTU 1500 and 9000; memif)"
"$bin/dsan-bench" data --idle adaptive --repeat 3 --mtu 1500,9000,61346 --mode af_packet,memif \
  "${data_args[@]}" --json "$out/data/data.json" --out "$out/data" | tee "$out/data/table.txt"

say "command round trip and connect latency"
"$bin/dsan-bench" connect --idle adaptive --json "$out/connect.json" | tee "$out/connect.txt"

say "applications (3 runs, alternating)"
bench/apps.sh --repeat 3 "${apps_args[@]}" --out "$out/apps"

say "hosts"
"${DSAN_PYTHON}" bench/hosts.py "${hosts_args[@]}" --out "$out/hosts"

for doc in docs/benchmarks.md README.md; do
  "$bin/dsan-bench" tables --write --data "$out" --doc "$doc"
  "$bin/dsan-bench" tables --check --data "$out" --doc "$doc"
done
echo "bench.sh: figures in $out, tables in docs/benchmarks.md and README.md ($(date -u +%T))" >&2
