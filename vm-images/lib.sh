# Shared by vm-images/* and tests/vm/run.sh. Source it; needs bash.
set -euo pipefail
vm_repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
vm_cache=${LIMINAL_CACHE_DIR:-$HOME/.cache/liminal}/vm
vm_mirror=${MIRROR:-http://deb.debian.org/debian}
vm_say() { printf '[vm %s] %s\n' "$(date +%T)" "$*" >&2; }
vm_die() { printf 'vm: %s\n' "$*" >&2; exit 1; }
# The base image is keyed by the recipe: change build-base or initrd-init and
# the next run rebuilds it (old ones are removed by build-base).
vm_base_key() {
  cat "$vm_repo/vm-images/build-base" "$vm_repo/vm-images/initrd-init" | sha256sum | cut -c1-12
}
vm_base_dir() { echo "$vm_cache/base-$(vm_base_key)"; }

# --- qemu (TCG: KVM does not work on the CI machine kind) -------------------
# vm_boot WORK_DIR: boots WORK_DIR/img.raw (snapshot=on: the disk stays
# pristine) in the background. Sets VM_PID and VM_QGA (the agent's socket).
# The caller's EXIT trap must call vm_kill (tests/vm/run.sh does).
VM_PID=
vm_boot() {
  local work=$1
  VM_QGA=$work/qga.sock
  rm -f "$VM_QGA" "$work/console.log"
  qemu-system-x86_64 -accel tcg -m 2048 -smp 2 \
    -bios /usr/share/qemu/qboot.rom -nodefaults -no-user-config -display none \
    -kernel "$work/vmlinuz" -initrd "$work/initrd.img" \
    -append "console=ttyS0 root=/dev/vda rw quiet loglevel=3 mitigations=off systemd.show_status=0 systemd.unit=multi-user.target" \
    -drive "file=$work/img.raw,if=virtio,format=raw,snapshot=on" \
    -serial "file:$work/console.log" \
    -device virtio-serial \
    -chardev "socket,path=$VM_QGA,server=on,wait=off,id=qga0" \
    -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0 \
    </dev/null >"$work/qemu.log" 2>&1 &
  VM_PID=$!
}
vm_kill() {
  [ -n "$VM_PID" ] || return 0
  kill "$VM_PID" 2>/dev/null || true
  local i; for i in $(seq 50); do kill -0 "$VM_PID" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$VM_PID" 2>/dev/null || true
  wait "$VM_PID" 2>/dev/null || true
  VM_PID=
}
vm_exec() { "$vm_repo/vm-images/qga" "$VM_QGA" exec "$@"; }
# vm_wait_agent SECONDS: until the guest agent answers (udev starts it early).
vm_wait_agent() {
  local deadline=$(( $(date +%s) + $1 ))
  while [ "$(date +%s)" -lt "$deadline" ]; do
    kill -0 "$VM_PID" 2>/dev/null || { vm_say "qemu exited"; return 1; }
    [ -S "$VM_QGA" ] && "$vm_repo/vm-images/qga" "$VM_QGA" ping && return 0
    sleep 0.5
  done
  return 1
}
