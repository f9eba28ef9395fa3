#!/usr/bin/env bash
# Installs what DeltaBox needs on a Debian 12 machine and builds it. Idempotent: installs only what is missing.
#   apt:       bubblewrap and btrfs-progs (benchmark baselines), xfsprogs (the layer store), python3, git, procps,
#              util-linux
#   crates.io: cargo-nextest (the test runner: one process per test, needed for namespace work)
#   PyPI:      the Python SDK (sdk/python) with pytest, into a virtualenv at target/pyenv (python3-venv from apt)
#   source:    CRIU >= 4.1 (scripts/setup-criu.sh; Debian 12's criu 3.17 fails on this kernel)
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "setup: DeltaBox manages namespaces, mounts and cgroups: run as root" >&2
    exit 1
fi

missing=()
for pair in bubblewrap:bwrap btrfs-progs:mkfs.btrfs xfsprogs:mkfs.xfs python3:python3 git:git procps:ps util-linux:losetup; do
    command -v "${pair#*:}" >/dev/null 2>&1 || missing+=("${pair%%:*}")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

python3 -c 'import venv, ensurepip' 2>/dev/null || {
    echo "setup: installing python3-venv"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
}

scripts/setup-criu.sh

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo not found (install Rust with rustup first)" >&2
    exit 1
fi
if ! cargo nextest --version >/dev/null 2>&1; then
    echo "setup: installing cargo-nextest"
    cargo install cargo-nextest --locked
fi

# Kernel features DeltaBox relies on; fail early with a clear reason.
grep -qw overlay /proc/filesystems || modprobe overlay 2>/dev/null || { echo "setup: overlayfs is not available" >&2; exit 1; }
[ -e /proc/self/ns/user ] || { echo "setup: user namespaces are not available" >&2; exit 1; }

cargo build --release --workspace --bins
[ -x target/pyenv/bin/python ] || python3 -m venv target/pyenv
target/pyenv/bin/pip install -q --disable-pip-version-check "./sdk/python[test]" schemathesis
echo "setup: ok (binary: target/release/deltabox; Python SDK: target/pyenv)"
