#!/usr/bin/env bash
# Sets up and runs the whole test suite: formatting, lints, every Rust test (unit, mocked
# API, CRD drift), and schema validation of the CRD and of the rendered examples.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
cd "$ROOT"

step() { echo "==> $*"; }

step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings

step "kubernetes-validate: CRD and rendered examples"
cargo build --quiet -p celery-operator
BIN="$CARGO_TARGET_DIR/debug/celery-operator"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
kubernetes-validate --strict -k 1.33.0 --quiet crds/*.yaml
for example in examples/*.yaml; do
  "$BIN" render -f "$example" >"$OUT/$(basename "$example")"
  kubernetes-validate --strict -k 1.33.0 --quiet "$OUT/$(basename "$example")"
  echo "$example: rendered objects are valid"
done

step "cargo test"
cargo test --workspace
