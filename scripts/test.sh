#!/usr/bin/env bash
# The README's second command (and CI's): the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
trap 'target/release/dsanctl lab down >/dev/null 2>&1 || true' EXIT
echo "test: cargo fmt --check"
cargo fmt --all -- --check
echo "test: cargo clippy --all-targets -- -D warnings"
cargo clippy --workspace --all-targets --quiet -- -D warnings
echo "test: cargo doc builds without warnings (no broken or private links)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
echo "test: the dataplane builds without DPDK (--no-default-features)"
cargo build -p dataplane --no-default-features --quiet
echo "test: the fuzz targets build (stable toolchain) and replay their seed corpora"
cargo build --manifest-path fuzz/Cargo.toml --release --quiet
fuzz/target/release/frame_parser fuzz/seeds/frame_parser/* > /tmp/dsan-fuzz-replay.log 2>&1 || { cat /tmp/dsan-fuzz-replay.log; exit 1; }
fuzz/target/release/proto_ops fuzz/seeds/proto_ops/* > /tmp/dsan-fuzz-replay.log 2>&1 || { cat /tmp/dsan-fuzz-replay.log; exit 1; }
fuzz/target/release/app_channel fuzz/seeds/app_channel/* > /tmp/dsan-fuzz-replay.log 2>&1 || { cat /tmp/dsan-fuzz-replay.log; exit 1; }
fuzz/target/release/ctl_message fuzz/seeds/ctl_message/* > /tmp/dsan-fuzz-replay.log 2>&1 || { cat /tmp/dsan-fuzz-replay.log; exit 1; }
echo "test: cargo test --release --workspace (unit, simulator: 10,400 schedules, lab)"
# A watchdog: the suite takes minutes; should anything hang, say what was
# running after 40 minutes and stop it, instead of eating CI's whole budget.
(
  trap 'kill "$nap" 2>/dev/null; exit 0' TERM
  sleep 2400 &
  nap=$!
  wait "$nap"
  echo "test: the suite has run for 40 minutes; still running:"
  ps -eo pid,etime,args | grep -E 'target/release/deps/|dsand|dsan-harness|dsan-sw-probe|dsan-bench' | grep -v grep
  pkill -TERM -f 'target/release/deps/' || true
) &
watchdog=$!
rc=0
cargo test --release --workspace -- --test-threads=2 || rc=$?
kill "$watchdog" 2>/dev/null || true
wait "$watchdog" 2>/dev/null || true
if [ "$rc" != 0 ]; then
  echo "test: FAILED (cargo test exited with $rc)"
  exit "$rc"
fi
echo "test: all passed"
