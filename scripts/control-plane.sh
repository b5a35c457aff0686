#!/usr/bin/env bash
# Builds, once, the real Kubernetes control plane of the test tier: kube-apiserver and
# kube-controller-manager 1.20.2 from Debian's source package `kubernetes` (the full source
# with vendored dependencies), plus etcd from Debian. Idempotent; the binaries are cached
# outside the clone, in $CELERY_OPERATOR_CACHE/control-plane. Prints the directory that holds
# them. Takes 15-50 minutes on 2 cores the first time, nothing after.
#
# Why 1.20.2 from source: no container engine, no kind and no release binaries can be had on
# these machines; Debian's package is the only Kubernetes source reachable, and it builds with
# Debian's Go 1.19 once two things the tarball lacks are added (see below).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${CELERY_OPERATOR_CACHE:-$HOME/.cache/celery-operator}/control-plane"
VERSION="1.20.5+really1.20.2-1.1+deb12u1"
OUT="$CACHE/v1.20.2"
log() { echo "control-plane: $*" >&2; }

if [ -x "$OUT/kube-apiserver" ] && [ -x "$OUT/kube-controller-manager" ] && command -v etcd >/dev/null; then
  echo "$OUT"
  exit 0
fi

if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi

# `apt-get source` needs deb-src entries: the machine's own Debian entries, as deb-src.
SRC_LIST=/etc/apt/sources.list.d/celery-operator-deb-src.sources
if [ ! -f "$SRC_LIST" ]; then
  log "adding deb-src entries derived from /etc/apt/sources.list.d/debian.sources"
  sed 's/^Types: deb$/Types: deb-src/' /etc/apt/sources.list.d/debian.sources | $SUDO tee "$SRC_LIST" >/dev/null
  $SUDO apt-get update -qq >&2
fi
missing=()
for pkg in golang-1.19-go etcd-server dpkg-dev; do
  [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  log "installing Debian packages: ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
fi

WORK="$CACHE/build"
rm -rf "$WORK"
mkdir -p "$WORK"
log "fetching the source package kubernetes=$VERSION"
(cd "$WORK" && apt-get source -qq "kubernetes=$VERSION" >&2)
SRC="$(find "$WORK" -maxdepth 1 -type d -name 'kubernetes-*' | head -n1)"

# GOPATH mode with the vendored dependencies, as Debian's own build does.
export GOPATH="$WORK/gopath" GOCACHE="$WORK/gocache" GO111MODULE=off CGO_ENABLED=0
export PATH="/usr/lib/go-1.19/bin:$PATH"
mkdir -p "$GOPATH/src/k8s.io"
ln -s "$SRC" "$GOPATH/src/k8s.io/kubernetes"
cd "$GOPATH/src/k8s.io/kubernetes"

# 1. reflect2 1.0.1 declares reflect.mapiterinit with the pre-Go-1.18 signature; under newer
# Go the API server faults in mapiterinit. reflect2 1.0.2's fix: pass a full hiter.
log "patching the vendored github.com/modern-go/reflect2 for Go >= 1.18"
python3 "$ROOT/tests/control-plane/patch_reflect2.py" vendor/github.com/modern-go/reflect2

# 2. The tarball has no pkg/generated/openapi; generate it as the upstream Makefile does:
# every directory (staging seen as vendor/) whose files carry +k8s:openapi-gen=, without
# code-generator and sample-apiserver.
log "generating pkg/generated/openapi"
go build -o "$WORK/openapi-gen" ./vendor/k8s.io/kube-openapi/cmd/openapi-gen
inputs="$(find -H . \( -path ./_\* -o -path ./.\* -o -path ./vendor \) -prune -o -type f -name '*.go' -print \
  | sed 's|^./staging/src|./vendor|' \
  | xargs grep -l '^// *+k8s:' | xargs grep -l '+k8s:openapi-gen=' \
  | xargs -n1 dirname | sed 's|^\./||' \
  | grep -v -e '^vendor/k8s.io/code-generator/' -e '^vendor/k8s.io/sample-apiserver/' \
  | LC_ALL=C sort -u | sed 's|^|k8s.io/kubernetes/|' | paste -sd, -)"
"$WORK/openapi-gen" --logtostderr -v 0 -i "$inputs" \
  -p k8s.io/kubernetes/pkg/generated/openapi -O zz_generated.openapi \
  -h vendor/k8s.io/code-generator/hack/boilerplate.go.txt \
  -r "$WORK/violations.report" >&2

log "building kube-apiserver and kube-controller-manager (15-50 minutes on 2 cores)"
ldflags="-s -w"
for pkg in k8s.io/kubernetes/vendor/k8s.io/component-base/version k8s.io/kubernetes/vendor/k8s.io/client-go/pkg/version; do
  ldflags+=" -X $pkg.gitVersion=v1.20.2 -X $pkg.gitMajor=1 -X $pkg.gitMinor=20 -X $pkg.gitTreeState=clean"
done
mkdir -p "$WORK/bin"
for cmd in kube-apiserver kube-controller-manager; do
  go build -ldflags "$ldflags" -o "$WORK/bin/$cmd" "./cmd/$cmd"
done

rm -rf "$OUT"
mv "$WORK/bin" "$OUT"
cd /
rm -rf "$WORK"
log "built into $OUT"
echo "$OUT"
