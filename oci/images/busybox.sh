#!/usr/bin/env bash
# Build the busybox-static example rootfs into DIR (default:
# ${LIMINAL_CACHE_DIR:-$HOME/.cache/liminal}/rootfs/busybox). Idempotent:
# a finished rootfs is marked with .liminal-rootfs and left alone.
set -euo pipefail
out=${1:-${LIMINAL_CACHE_DIR:-$HOME/.cache/liminal}/rootfs/busybox}
bb=/bin/busybox
if [ -f "$out/.liminal-rootfs" ]; then
  # Older versions left the root 0700 (mktemp's mode): the sandbox's mapped
  # ids cannot traverse it, which costs an overlay per run. Only the root's
  # mode changes.
  [ "$(stat -c %a "$out")" = 755 ] || chmod 755 "$out" || true
  echo "$out"; exit 0
fi
if ! "$bb" --list 2>/dev/null | grep -qx sh || ldd "$bb" >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq busybox-static >/dev/null
  else
    echo "busybox.sh: needs the busybox-static package (apt-get install busybox-static)" >&2; exit 2
  fi
fi
tmp=$(mktemp -d "${out%/*}.tmp.XXXXXX" 2>/dev/null || { mkdir -p "${out%/*}"; mktemp -d "${out%/*}/.tmp.XXXXXX"; })
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,workspace,root}
cp "$bb" "$tmp/bin/busybox"
for applet in $("$bb" --list); do
  [ "$applet" = busybox ] || ln -sf busybox "$tmp/bin/$applet"
done
printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n' > "$tmp/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$tmp/etc/group"
chmod 755 "$tmp"; chmod 1777 "$tmp/tmp"
# Fixed mtimes: the rootfs digest must not depend on when it was built.
find "$tmp" -exec touch -h -d @0 {} +
touch "$tmp/.liminal-rootfs"
rm -rf "$out"; mkdir -p "${out%/*}"; mv "$tmp" "$out"; trap - EXIT
echo "$out"
