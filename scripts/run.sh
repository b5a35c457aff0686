#!/usr/bin/env bash
# The main job: the operator scaling real Celery workers on this machine, with no cluster.
# Sets up (scripts/setup.sh), builds the operator, renders and validates the examples, then
# runs `celery-operator sandbox`: an in-memory Kubernetes API server, redis-server, the
# operator and Celery workers as local processes, a burst of tasks; it shows the pool live
# and ends with a report (plot, reaction times, every task accounted for) in
# ./sandbox-report. Arguments go to `celery-operator sandbox` (see its --help), e.g.
#   scripts/run.sh --profile spikes --duration 120 --rate 2
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$ROOT/scripts/setup.sh"
cd "$ROOT"

cargo build --release -p celery-operator >&2
BIN="$CARGO_TARGET_DIR/release/celery-operator"

# What the operator would apply for each example, validated against Kubernetes 1.33.
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT
for example in examples/*.yaml; do
  name="$(basename "$example" .yaml)"
  "$BIN" render -f "$example" >"$OUT/$name.yaml"
  kubernetes-validate --strict -k 1.33.0 --quiet "$OUT/$name.yaml" >&2
  echo "render: $example -> $(grep -c '^kind:' "$OUT/$name.yaml") objects, valid for Kubernetes 1.33 ($BIN render -f $example)"
done

# The sandbox: by default a burst of 60 tasks of 10 s, compared with KEDA + HPA.
if [ "$#" -eq 0 ]; then
  set -- --profile burst --duration 60 --rate 1 --task-seconds 10 --compare keda
fi
"$BIN" sandbox --out sandbox-report "$@"
echo "report: $ROOT/sandbox-report/report.md (plot: sandbox-report/report.svg)"
