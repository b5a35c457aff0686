#!/usr/bin/env bash
# Tests of the Helm chart: lint, render with default / all-on / single-namespace values,
# validate every rendered object against the Kubernetes 1.33 schemas, check that the values
# schema rejects typos and wrong types, and that the chart's RBAC equals what the operator's
# code needs (`celery-operator rbac`). Needs helm and kubernetes-validate on PATH (set up by
# scripts/setup.sh) and the operator binary as $1.
set -euo pipefail
BIN="$1"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
CHART="$ROOT/charts/celery-operator"
OUT="$(mktemp -d)"
trap 'rm -rf "$OUT"' EXIT

helm lint --quiet "$CHART"
helm lint --quiet "$CHART" -f "$CHART/ci/all-on-values.yaml"

helm template ops "$CHART" --namespace ops >"$OUT/default.yaml"
helm template ops "$CHART" --namespace ops -f "$CHART/ci/all-on-values.yaml" >"$OUT/all-on.yaml"
helm template ops "$CHART" --namespace ops --set watch.allNamespaces=false --set replicaCount=3 >"$OUT/single.yaml"
for f in default all-on single; do
  # ServiceMonitor is a CRD kubernetes-validate has no schema for: it warns and skips it.
  kubernetes-validate --strict -k 1.33.0 --quiet "$OUT/$f.yaml"
  echo "chart: $f values render valid objects"
done

expect_failure() {
  local why="$1"; shift
  if helm template ops "$CHART" "$@" >"$OUT/bad.txt" 2>&1; then
    echo "chart: values $* were accepted" >&2; exit 1
  fi
  grep -q "$why" "$OUT/bad.txt" || { cat "$OUT/bad.txt" >&2; exit 1; }
}
expect_failure "Additional property imagee is not allowed" --set imagee.tag=1
expect_failure "replicaCount: Invalid type" --set replicaCount=two
expect_failure "failurePolicy.shaper" --set plugins.failurePolicy.shaper=retry
expect_failure "logging.format" --set logging.format=xml
echo "chart: the values schema rejects typos and wrong types"

"$BIN" rbac >"$OUT/rbac.json"
python3 - "$OUT" <<'PY'
import json, sys
import yaml  # installed with kubernetes-validate

out = sys.argv[1]
code = json.load(open(f"{out}/rbac.json"))

def norm(rules):
    return sorted((tuple(r["apiGroups"]), tuple(r["resources"]), tuple(sorted(r["verbs"]))) for r in rules)

def roles(path):
    docs = [d for d in yaml.safe_load_all(open(path)) if d]
    return {(d["kind"], d["metadata"]["name"]): d["rules"] for d in docs if d["kind"] in ("ClusterRole", "Role")}

watched = norm(code["watchedNamespaces"])
operator = norm(code["operatorNamespace"])
without_lease = [r for r in operator if r[1] != ("leases",)]

cases = [
    ("default", {("ClusterRole", "ops-celery-operator"): watched, ("Role", "ops-celery-operator"): without_lease}),
    ("single", {("Role", "ops-celery-operator-watched"): watched, ("Role", "ops-celery-operator"): operator}),
    ("all-on", {("Role", "ops-celery-operator-watched"): watched, ("Role", "ops-celery-operator"): operator}),
]
for name, expected in cases:
    got = {k: norm(v) for k, v in roles(f"{out}/{name}.yaml").items()}
    if got != expected:
        sys.exit(f"chart RBAC ({name} values) differs from `celery-operator rbac`:\nchart: {got}\ncode:  {expected}")
print("chart: RBAC equals the rules derived from the operator's code")
PY
