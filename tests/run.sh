#!/usr/bin/env bash
# The test command: installs what the tests need (idempotent), builds the workspace, runs
# the Rust tests and the end-to-end tests. Works from any directory; on a fresh Debian
# machine it needs root (or passwordless sudo) for apt-get.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$(pwd)
export DEBIAN_FRONTEND=noninteractive

log() { printf '==> %s\n' "$*"; }

# --- system packages: only what is missing -------------------------------------------
SUDO=""
if [ "$(id -u)" != 0 ] && command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; fi
missing=()
command -v ss >/dev/null 2>&1 || missing+=(iproute2)
command -v ps >/dev/null 2>&1 || missing+=(procps)
command -v curl >/dev/null 2>&1 || missing+=(curl)
command -v cc >/dev/null 2>&1 || missing+=(build-essential)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
# network-namespace tests (tern-init, interception): iptables (nft and legacy backends),
# tcpdump for "is it TLS on the wire", setpriv to run a sidecar as the proxy UID;
# testssl.sh for TLS audits.
command -v iptables-nft-restore >/dev/null 2>&1 || missing+=(iptables)
command -v tcpdump >/dev/null 2>&1 || missing+=(tcpdump)
command -v setpriv >/dev/null 2>&1 || missing+=(util-linux)
command -v testssl >/dev/null 2>&1 || command -v testssl.sh >/dev/null 2>&1 || missing+=(testssl.sh)
VENV="$ROOT/.venv"
if [ ! -x "$VENV/bin/python" ] && command -v python3 >/dev/null 2>&1; then
    # Debian's own python3 needs python3-venv for `python3 -m venv` (pyenv builds have it).
    probe=$(mktemp -d)
    python3 -m venv "$probe/v" >/dev/null 2>&1 || missing+=(python3-venv)
    rm -rf "$probe"
fi
if [ ${#missing[@]} -gt 0 ]; then
    log "installing system packages: ${missing[*]}"
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# --- Python virtualenv for the e2e tests -------------------------------------------------
REQ="$ROOT/tests/requirements.txt"
STAMP="$VENV/.requirements.sha256"
want=$(sha256sum "$REQ" | cut -d' ' -f1)
if [ ! -x "$VENV/bin/python" ] || [ "$(cat "$STAMP" 2>/dev/null)" != "$want" ]; then
    log "setting up $VENV"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ"
    echo "$want" > "$STAMP"
fi

# --- build and test ------------------------------------------------------------------------
log "cargo build --workspace --bins"
cargo build --workspace --bins
log "cargo test --workspace"
cargo test --workspace
log "pytest tests/e2e"
# -p no:cacheprovider: CI clones are read-mostly; nothing to cache between runs.
"$VENV/bin/python" -m pytest tests/e2e -q -p no:cacheprovider --timeout=180 "$@"
