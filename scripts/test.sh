#!/usr/bin/env bash
# Sets up and runs the whole test suite: formatting, lints, every Rust test (unit, CLI and
# CRD drift, the plugin runtime with real and hostile components, real brokers and workers,
# the plugins' own tests, the operator binary against the in-memory API server and against a
# real Kubernetes control plane), schema validation of the CRD, the rendered examples and a packed
# plugin, and the Helm chart (lint, render, validate, values schema, RBAC derived from the
# code).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
cd "$ROOT"

# The real control plane of the test tier: built once (15-50 minutes on 2 cores), cached.
CELERY_CONTROL_PLANE_DIR="$(scripts/control-plane.sh)"
export CELERY_CONTROL_PLANE_DIR

step() { echo "==> $*"; }

# The plugins are a workspace of their own (they build for wasm32-wasip2).
PLUGINS=(--manifest-path plugins/Cargo.toml)
export CELERY_PLUGINS_TARGET_DIR="${CELERY_PLUGINS_TARGET_DIR:-$CARGO_TARGET_DIR/wasm-plugins}"

step "cargo fmt --check"
cargo fmt --all -- --check
cargo fmt --all "${PLUGINS[@]}" -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets --quiet -- -D warnings
cargo clippy --workspace --all-targets --quiet "${PLUGINS[@]}" --target-dir "$CELERY_PLUGINS_TARGET_DIR" -- -D warnings

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
"$BIN" plugin pack "$CELERY_PLUGINS_TARGET_DIR/wasm32-wasip2/release/business_hours.wasm" \
  --name business-hours --namespace celery-operator >"$OUT/plugin.yaml"
kubernetes-validate --strict -k 1.33.0 --quiet "$OUT/plugin.yaml"
echo "plugin pack: the ConfigMap is valid"

step "Helm chart"
tests/chart/test.sh "$BIN"

step "cargo test (plugins, native)"
cargo test --quiet "${PLUGINS[@]}" --target-dir "$CELERY_PLUGINS_TARGET_DIR" 2>&1 | tee "$OUT/tests.log"

step "cargo test"
cargo test --workspace 2>&1 | tee -a "$OUT/tests.log"

# One closing line over every test binary (the last cargo line is a doc-test run with 0 tests).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$OUT/tests.log"
