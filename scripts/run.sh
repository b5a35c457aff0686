#!/usr/bin/env bash
# The main job, for now: build the operator and render every example Celery resource into
# the Kubernetes objects the operator would apply, validated against the Kubernetes 1.33
# schemas. Output: the manifests on stdout.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
cd "$ROOT"

cargo build --release -p celery-operator >&2
BIN="$CARGO_TARGET_DIR/release/celery-operator"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for example in examples/*.yaml; do
  name="$(basename "$example" .yaml)"
  "$BIN" render -f "$example" >"$OUT/$name.yaml"
  kubernetes-validate --strict -k 1.33.0 --quiet "$OUT/$name.yaml" >&2
  echo "# ---- $example: $(grep -c '^kind:' "$OUT/$name.yaml") objects, valid for Kubernetes 1.33"
  cat "$OUT/$name.yaml"
done
