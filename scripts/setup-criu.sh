#!/usr/bin/env bash
# Installs CRIU >= 4.1 as /usr/local/sbin/criu: the baseline of `deltabox bench cr` and, later, the durable path.
# Debian 12's own criu (3.17) fails on kernels >= 6.13 ("vdso: Unexpected rt vDSO area bounds") and Debian's 4.1.x
# binary package needs a newer glibc, so this builds the upstream source of Debian trixie's criu package. The
# tarball comes from the Debian archive through apt (a private deb-src list, nothing added to the system's
# sources) and is checked against the SHA-256 in the signed Sources index. Idempotent: does nothing when a
# criu >= 4.1 is already installed.
set -euo pipefail

# Built with its kernel-probe cache on a tmpfs (RUNDIR): on a disk it is not kept, and every criu call would
# re-probe the kernel (~70 ms), which the benchmark would wrongly count as CRIU's cost.
stamp=/usr/local/share/deltabox/criu.build
build="rundir=/dev/shm"
have=$(criu --version 2>/dev/null | awk '/^Version:/ {print $2}' || true)
if [ -n "$have" ] && [ "$(printf '%s\n4.1\n' "$have" | sort -V | head -1)" = "4.1" ] \
    && { [ "$(command -v criu)" != /usr/local/sbin/criu ] || [ "$(cat "$stamp" 2>/dev/null)" = "$build" ]; }; then
    exit 0
fi

deps=(build-essential pkg-config libprotobuf-c-dev protobuf-c-compiler libprotobuf-dev protobuf-compiler
      python3-protobuf libnl-3-dev libnet1-dev libcap-dev libbsd-dev libgnutls28-dev libnftables-dev uuid-dev
      libaio-dev)
missing=()
for p in "${deps[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "setup-criu: installing build dependencies: ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

work=/var/cache/deltabox/criu
mkdir -p "$work/apt/lists/partial" "$work/apt/cache/archives/partial"
echo "deb-src http://deb.debian.org/debian trixie main" > "$work/sources.list"
apt_private=(-o "Dir::Etc::SourceList=$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
             -o "Dir::State::Lists=$work/apt/lists" -o "Dir::Cache=$work/apt/cache")
apt-get "${apt_private[@]}" update -qq
stanza=$(apt-cache "${apt_private[@]}" showsrc criu)
version=$(awk '/^Version:/ {print $2; exit}' <<<"$stanza")
dir=$(awk '/^Directory:/ {print $2; exit}' <<<"$stanza")
read -r sha size file < <(awk '/^Checksums-Sha256:/ {on=1; next} /^[^ ]/ {on=0} on && $3 ~ /orig\.tar/ {print $1, $2, $3; exit}' <<<"$stanza")
if [ -z "${file:-}" ]; then
    echo "setup-criu: no criu source in Debian trixie's index" >&2
    exit 1
fi
echo "setup-criu: building criu from Debian's $version source ($file, $size bytes)"
install -d -o _apt "$work/dl" 2>/dev/null || mkdir -p "$work/dl"
if [ ! -f "$work/dl/$file" ] || ! echo "$sha  $work/dl/$file" | sha256sum -c --quiet -; then
    /usr/lib/apt/apt-helper download-file "http://deb.debian.org/debian/$dir/$file" "$work/dl/$file" "SHA256:$sha"
fi
rm -rf "$work/src" && mkdir -p "$work/src"
tar -xf "$work/dl/$file" -C "$work/src" --strip-components=1
make -C "$work/src" -j"$(nproc)" RUNDIR=/dev/shm criu >"$work/build.log" 2>&1 || {
    tail -30 "$work/build.log" >&2
    echo "setup-criu: build failed (log: $work/build.log)" >&2
    exit 1
}
install -m 0755 "$work/src/criu/criu" /usr/local/sbin/criu
mkdir -p "$(dirname "$stamp")" && echo "$build" > "$stamp"
echo "setup-criu: $(/usr/local/sbin/criu --version | head -1) installed as /usr/local/sbin/criu"
