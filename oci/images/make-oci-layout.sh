#!/usr/bin/env bash
# Make a small OCI image layout from a rootfs folder, for tests and benches.
#   make-oci-layout.sh [ROOTFS [LAYOUT [TAG]]]
# Defaults: the busybox rootfs (built by busybox.sh if missing),
# ${LIMINAL_CACHE_DIR:-$HOME/.cache/liminal}/oci-layouts/busybox, tag "latest".
# Two layers: the rootfs, then a layer that adds /etc/motd and whites out
# /etc/group (so whiteouts are exercised). Needs umoci (apt: umoci).
# Idempotent: a finished layout is marked with .liminal-layout and left alone.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${LIMINAL_CACHE_DIR:-$HOME/.cache/liminal}
rootfs=${1:-$("$here/busybox.sh")}
out=${2:-$cache/oci-layouts/busybox}
tag=${3:-latest}
if [ -f "$out/.liminal-layout" ]; then echo "$out"; exit 0; fi
command -v umoci >/dev/null || { echo "make-oci-layout.sh: needs umoci (apt-get install umoci)" >&2; exit 2; }
mkdir -p "${out%/*}"
tmp=$(mktemp -d "${out%/*}/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
umoci init --layout "$tmp/layout"
umoci new --image "$tmp/layout:$tag"
# umoci new leaves an empty-rootfs manifest; insert adds one layer each time.
umoci insert --image "$tmp/layout:$tag" "$rootfs" /
printf 'made by make-oci-layout.sh\n' > "$tmp/motd"
umoci insert --image "$tmp/layout:$tag" "$tmp/motd" /etc/motd
umoci insert --image "$tmp/layout:$tag" --whiteout /etc/group
umoci gc --layout "$tmp/layout"
touch "$tmp/layout/.liminal-layout"
rm -rf "$out"; mv "$tmp/layout" "$out"
echo "$out"
