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
echo "test: cargo test --release --workspace"
cargo test --release --workspace -- --test-threads=2
echo "test: all passed"
