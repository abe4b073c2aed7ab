#!/usr/bin/env bash
# Build a Debian bookworm minbase rootfs into DIR (default:
# ${LIMINAL_CACHE_DIR:-$HOME/.cache/liminal}/rootfs/bookworm-minbase).
# About 45 s and 200 MB. Needs root and the debootstrap package (and network
# access to a Debian mirror; MIRROR overrides deb.debian.org).
# Idempotent: a finished rootfs is marked with .liminal-rootfs and left alone.
set -euo pipefail
out=${1:-${LIMINAL_CACHE_DIR:-$HOME/.cache/liminal}/rootfs/bookworm-minbase}
mirror=${MIRROR:-http://deb.debian.org/debian}
if [ -f "$out/.liminal-rootfs" ]; then echo "$out"; exit 0; fi
if [ "$(id -u)" != 0 ]; then echo "debootstrap.sh: needs root" >&2; exit 2; fi
if ! command -v debootstrap >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
mkdir -p "${out%/*}"
tmp=$(mktemp -d "${out%/*}/.tmp.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
debootstrap --variant=minbase bookworm "$tmp" "$mirror" >&2
# No apt caches or logs with build times in the image.
rm -rf "$tmp"/var/cache/apt/*.bin "$tmp"/var/lib/apt/lists/* "$tmp"/var/log/* \
       "$tmp"/var/cache/ldconfig/aux-cache
# mktemp made the root 0700; a rootfs root is 0755.
chmod 0755 "$tmp"
# Fixed mtimes: the rootfs digest must not depend on when it was built.
find "$tmp" -xdev -exec touch -h -d @0 {} +
touch "$tmp/.liminal-rootfs"
rm -rf "$out"; mv "$tmp" "$out"; trap - EXIT
echo "$out"
