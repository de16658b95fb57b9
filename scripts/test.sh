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
echo "test: the dataplane builds without DPDK (--no-default-features)"
cargo build -p dataplane --no-default-features --quiet
echo "test: the fuzz targets build (stable toolchain) and replay their seed corpora"
cargo build --manifest-path fuzz/Cargo.toml --release --quiet
fuzz/target/release/frame_parser fuzz/seeds/frame_parser/* > /tmp/dsan-fuzz-replay.log 2>&1 || { cat /tmp/dsan-fuzz-replay.log; exit 1; }
fuzz/target/release/proto_ops fuzz/seeds/proto_ops/* > /tmp/dsan-fuzz-replay.log 2>&1 || { cat /tmp/dsan-fuzz-replay.log; exit 1; }
fuzz/target/release/app_channel fuzz/seeds/app_channel/* > /tmp/dsan-fuzz-replay.log 2>&1 || { cat /tmp/dsan-fuzz-replay.log; exit 1; }
echo "test: cargo test --release --workspace (unit, simulator: 10,000 schedules, lab)"
cargo test --release --workspace -- --test-threads=2
echo "test: all passed"
