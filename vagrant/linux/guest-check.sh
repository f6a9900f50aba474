#!/usr/bin/env bash
# The project on a real Debian 12 host: systemd, the unified cgroup v2
# hierarchy, the shipped unit. Builds (once, cached) a bookworm root
# filesystem with mmdebstrap, boots it under QEMU with no network device,
# shares this checkout read-only and a results dir over 9p, and lets the
# guest (vagrant/linux/guest-inside.sh, started by systemd at boot) install
# the project from wheels built here, check the v2 limits under
# pyemperor.service, run the suite and bench/spawn.py, then power off.
#
#   bash vagrant/linux/guest-check.sh        (as root; exit 0 = every check passed)
#
# Environment: PYEMPEROR_GUEST_CACHE (default /var/cache/pyemperor-guest),
# PYEMPEROR_GUEST_RESULTS (default /var/tmp/pyemperor-guest), kept after the
# run with the serial log; PYEMPEROR_GUEST_TIMEOUT (minutes, default 70);
# PYEMPEROR_GUEST_TESTS (pytest arguments inside, default "tests").
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
CHECKOUT=$(cd "$HERE/../.." && pwd)
CACHE=${PYEMPEROR_GUEST_CACHE:-/var/cache/pyemperor-guest}
RESULTS=${PYEMPEROR_GUEST_RESULTS:-/var/tmp/pyemperor-guest}
TIMEOUT_MIN=${PYEMPEROR_GUEST_TIMEOUT:-70}
PY=/usr/bin/python3

log() { printf '[guest-check %(%H:%M:%S)T] %s\n' -1 "$*"; }
die() { log "FAILED: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root (mmdebstrap, mkfs and the 9p shares need it)"

need_apt=()
command -v mmdebstrap >/dev/null || need_apt+=(mmdebstrap)
command -v qemu-system-x86_64 >/dev/null || need_apt+=(qemu-system-x86)
command -v mkfs.ext4 >/dev/null || need_apt+=(e2fsprogs)
"$PY" -c 'import ensurepip, venv' 2>/dev/null || need_apt+=(python3-venv)
[ -e /usr/include/python3.11/Python.h ] || need_apt+=(python3-dev)
command -v gcc >/dev/null || need_apt+=(gcc)
if [ ${#need_apt[@]} -gt 0 ]; then
    log "installing ${need_apt[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

# --- results dir and wheels (the guest has no network) -------------------------
rm -rf "$RESULTS"
mkdir -p "$RESULTS/wheels/tuntap"
SERIAL=$RESULTS/serial.log
log "building wheels on the host"
start=$SECONDS
WHEEL_VENV=$(mktemp -d /var/tmp/pyemperor-wheels.XXXXXX)
cleanup_host() {
    rm -rf "$WHEEL_VENV"
    [ -z "${rootfs:-}" ] || rm -rf "$rootfs"
    if [ -n "${QEMU_PID:-}" ] && kill -0 "$QEMU_PID" 2>/dev/null; then
        kill "$QEMU_PID" 2>/dev/null || true
        wait "$QEMU_PID" 2>/dev/null || true
    fi
}
trap cleanup_host EXIT
trap 'exit 143' TERM INT HUP  # (so that the EXIT trap stops the guest)
"$PY" -m venv "$WHEEL_VENV"
pip_quiet() {  # (a machine's pip.conf may name find-links dirs that are not there)
    "$@" 2> >(grep -v '^WARNING: Location' >&2)
}
pip_quiet "$WHEEL_VENV/bin/pip" install -q --upgrade pip
pip_quiet "$WHEEL_VENV/bin/pip" wheel -q -w "$RESULTS/wheels" "$CHECKOUT[test,uwsgi,gevent,auth]" pip setuptools wheel
UWSGI_EMBED_PLUGINS=tuntap pip_quiet "$WHEEL_VENV/bin/pip" wheel -q --no-cache-dir --no-binary :all: --no-deps \
    -w "$RESULTS/wheels/tuntap" uwsgi
rm -f "$RESULTS"/wheels/pyemperor-*.whl  # installed editable from the checkout, as .ci/run does
log "wheels built in $((SECONDS - start)) s: $(ls "$RESULTS/wheels" | wc -l) files"
# (-vv after .ci/run's -q: one line per test, so a slow guest's log shows where it is)
# The shared libraries the wheels' binaries were linked against here (uWSGI
# picks up libxml2, libssl... where they are installed): the guest gets the
# Debian packages that hold them.
wheel_libs() {
    local unpacked
    unpacked=$(mktemp -d /var/tmp/pyemperor-wheel-libs.XXXXXX)
    for wheel in "$RESULTS"/wheels/*.whl "$RESULTS"/wheels/tuntap/*.whl; do
        "$PY" -m zipfile -e "$wheel" "$unpacked/$(basename "$wheel")" 2>/dev/null || true
    done
    find "$unpacked" -type f \( -name '*.so*' -o -path '*/bin/*' -o -name uwsgi \) -exec sh -c \
        'head -c4 "$1" | grep -q ELF && ldd "$1" 2>/dev/null' _ {} \; |
        awk '/=> \//{print $3}' | sort -u | while read -r lib; do
            # (merged /usr: dpkg knows a library by one of its two paths)
            dpkg -S "$lib" 2>/dev/null || dpkg -S "$(realpath "$lib")" 2>/dev/null || true
        done | cut -d: -f1 | sort -u
    rm -rf "$unpacked"
}
mapfile -t WHEEL_PACKAGES < <(wheel_libs)
log "the wheels' binaries need: ${WHEEL_PACKAGES[*]:-nothing beyond libc}"
printf '%s\n' "${PYEMPEROR_GUEST_TESTS:--vv --durations=20 tests}" > "$RESULTS/pytest-args"

# --- the root filesystem, cached by what goes into it -------------------------
# What the guest needs: an init and a kernel, what .ci/run would otherwise
# fetch with apt (it finds them all present and installs nothing), and what
# the tests and the provisioning call.
PACKAGES=(
    systemd systemd-sysv dbus udev kmod linux-image-amd64 initramfs-tools
    python3 python3-venv python3-dev gcc libc6-dev
    iproute2 nginx iperf3 wrk curl procps psmisc util-linux mount passwd
    nftables e2fsprogs ca-certificates libpcre2-dev rsyslog
    "${WHEEL_PACKAGES[@]}"
)
SOURCES=/etc/apt/sources.list.d/debian.sources
[ -f "$SOURCES" ] || SOURCES=/etc/apt/sources.list
[ -f "$SOURCES" ] || die "no apt sources on this machine to take the Debian archive from"
key=$( { printf '%s\n' "${PACKAGES[@]}" | sort -u; cat "$SOURCES"; sed -n '/^customize()/,/^}/p' "$0"; } | sha256sum | cut -c1-16)
IMAGE_DIR=$CACHE/bookworm-$key

customize() {  # $1: the root filesystem dir
    local root=$1
    echo pyemperor-guest > "$root/etc/hostname"
    # What the Debian installer writes (mmdebstrap leaves none): without it
    # "localhost" resolves to nothing.
    cat > "$root/etc/hosts" <<'HOSTS'
127.0.0.1	localhost
127.0.1.1	pyemperor-guest
::1	localhost ip6-localhost ip6-loopback
ff02::1	ip6-allnodes
ff02::2	ip6-allrouters
HOSTS
    cat > "$root/etc/fstab" <<'FSTAB'
/dev/vda  /             ext4  rw,errors=remount-ro  0 1
src       /mnt/src      9p    trans=virtio,version=9p2000.L,ro,msize=262144,nofail  0 0
results   /mnt/results  9p    trans=virtio,version=9p2000.L,rw,msize=262144,nofail  0 0
FSTAB
    mkdir -p "$root/mnt/src" "$root/mnt/results"
    printf '9p\n9pnet_virtio\n' > "$root/etc/modules-load.d/9p.conf"
    # The check itself lives in the shared checkout: changing it needs no rebuild.
    cat > "$root/etc/systemd/system/pyemperor-guest-check.service" <<'UNIT'
[Unit]
Description=pyemperor guest check (vagrant/linux/guest-inside.sh from the 9p share)
Requires=mnt-src.mount mnt-results.mount
After=mnt-src.mount mnt-results.mount multi-user.target
[Service]
Type=oneshot
ExecStart=/bin/bash /mnt/src/vagrant/linux/guest-inside.sh
ExecStopPost=/bin/systemctl --no-block poweroff
StandardOutput=journal+console
StandardError=journal+console
TimeoutStartSec=infinity
[Install]
WantedBy=multi-user.target
UNIT
    ln -sf /etc/systemd/system/pyemperor-guest-check.service \
        "$root/etc/systemd/system/multi-user.target.wants/pyemperor-guest-check.service"
    # No network device: nothing to wait for.
    ln -sf /dev/null "$root/etc/systemd/system/systemd-networkd-wait-online.service"
    ln -sf /dev/null "$root/etc/systemd/system/nginx.service"  # the tests start their own
    passwd -R "$root" -d root >/dev/null
}

if [ -f "$IMAGE_DIR/ready" ]; then
    log "root filesystem cached: $IMAGE_DIR"
else
    log "building the bookworm root filesystem (${#PACKAGES[@]} packages) from $SOURCES"
    rm -rf "$IMAGE_DIR"
    mkdir -p "$IMAGE_DIR"
    rootfs=$(mktemp -d /var/tmp/pyemperor-rootfs.XXXXXX)
    start=$SECONDS
    mmdebstrap --variant=minbase --include="$(IFS=,; echo "${PACKAGES[*]}")" \
        bookworm "$rootfs" "$SOURCES" > "$IMAGE_DIR/mmdebstrap.log" 2>&1 \
        || { tail -30 "$IMAGE_DIR/mmdebstrap.log"; die "mmdebstrap failed (log: $IMAGE_DIR/mmdebstrap.log)"; }
    customize "$rootfs"
    cp "$(ls -1 "$rootfs"/boot/vmlinuz-* | sort -V | tail -1)" "$IMAGE_DIR/vmlinuz"
    cp "$(ls -1 "$rootfs"/boot/initrd.img-* | sort -V | tail -1)" "$IMAGE_DIR/initrd.img"
    # Room for the venvs, the wheels and what the tests write.
    truncate -s 8G "$IMAGE_DIR/root.ext4"
    mkfs.ext4 -q -L pyemperor-root -d "$rootfs" "$IMAGE_DIR/root.ext4"
    rm -rf "$rootfs"
    rootfs=
    touch "$IMAGE_DIR/ready"
    log "root filesystem built in $((SECONDS - start)) s"
fi
# Older builds (another package list) are not needed again.
for old in "$CACHE"/bookworm-*; do
    [ "$old" = "$IMAGE_DIR" ] || rm -rf "$old"
done

# bench/spawn.py's limit cost on this host's hierarchy, to print beside the guest's.
if [ -x /opt/pyemperor/bin/python ] && /opt/pyemperor/bin/python -c 'import emperor' 2>/dev/null; then
    (cd "$CHECKOUT" && /opt/pyemperor/bin/python bench/spawn.py --limits-only --samples 10) \
        > "$RESULTS/bench-spawn-host.txt" 2>&1 || log "bench/spawn.py on the host failed (see $RESULTS/bench-spawn-host.txt)"
fi

# --- KVM or TCG -----------------------------------------------------------------
# /dev/kvm may be there and still not run a stock kernel (this machine is
# itself a VM: its KVM stops with "emulation failure"). Ask it to boot the
# kernel to the point where it finds no root and panics.
accel="tcg,thread=multi"
if [ -w /dev/kvm ]; then
    probe=$(mktemp /var/tmp/pyemperor-kvm.XXXXXX)
    timeout 20 qemu-system-x86_64 -accel kvm -cpu host -m 512M -nic none -display none \
        -no-reboot -serial "file:$probe" -kernel "$IMAGE_DIR/vmlinuz" \
        -append "console=ttyS0 panic=-1 root=/dev/nonexistent" >"$probe.out" 2>&1 || true
    if grep -q "Kernel panic" "$probe"; then
        accel=kvm
        log "KVM works: the probe kernel booted to its expected panic"
    else
        log "KVM does not run this kernel ($(grep -m1 -o 'KVM internal error.*\|emulation failure' "$probe.out" || echo 'no panic seen in 20 s')): using TCG"
    fi
    rm -f "$probe" "$probe.out"
else
    log "no usable /dev/kvm: using TCG"
fi
cpu=max
[ "$accel" = kvm ] && cpu=host

echo "$accel" > "$RESULTS/accel"

# --- boot -------------------------------------------------------------------------
log "booting the guest ($accel), serial console in $SERIAL, limit $TIMEOUT_MIN min"
start=$SECONDS
qemu-system-x86_64 -accel "$accel" -cpu "$cpu" -smp 2 -m 4G \
    -nic none -display none -monitor none -no-reboot \
    -serial "file:$SERIAL" \
    -kernel "$IMAGE_DIR/vmlinuz" -initrd "$IMAGE_DIR/initrd.img" \
    -append "root=/dev/vda rw console=ttyS0 panic=-1 systemd.unified_cgroup_hierarchy=1 systemd.show_status=1" \
    -drive "file=$IMAGE_DIR/root.ext4,format=raw,if=virtio,snapshot=on" \
    -virtfs "local,path=$CHECKOUT,mount_tag=src,security_model=none,readonly=on" \
    -virtfs "local,path=$RESULTS,mount_tag=results,security_model=none" \
    > "$RESULTS/qemu.out" 2>&1 &
QEMU_PID=$!
deadline=$((SECONDS + TIMEOUT_MIN * 60))
while kill -0 "$QEMU_PID" 2>/dev/null; do
    if [ $SECONDS -gt $deadline ]; then
        log "guest still running after $TIMEOUT_MIN min: stopping it"
        kill "$QEMU_PID" || true
        break
    fi
    sleep 2
done
wait "$QEMU_PID" 2>/dev/null || true
QEMU_PID=
log "guest off after $((SECONDS - start)) s"
rm -rf "$RESULTS/wheels"

# --- verdict ----------------------------------------------------------------------
if [ -s "$RESULTS/qemu.out" ]; then
    log "qemu said:"; cat "$RESULTS/qemu.out"
fi
[ -f "$RESULTS/result" ] || { tail -40 "$SERIAL"; die "the guest wrote no result (serial log: $SERIAL)"; }
cat "$RESULTS/result"
for where in host guest; do
    file=$RESULTS/bench-spawn.txt
    [ $where = host ] && file=$RESULTS/bench-spawn-host.txt
    [ -f "$file" ] && { log "bench/spawn.py on the $where:"; cat "$file"; }
done
if [ -f "$RESULTS/bench-spawn-host.txt" ] && [ -f "$RESULTS/bench-spawn.txt" ]; then
    # The guest is emulated (several times slower): compare what limits cost
    # a spawn on each hierarchy, not milliseconds across machines.
    "$PY" - "$RESULTS/bench-spawn-host.txt" "$RESULTS/bench-spawn.txt" <<'PYCODE' || true
import re, sys
ratio = lambda path: float(re.search(r"ratio \(e\)/\(a\) ([0-9.]+)", open(path).read()).group(1))
host, guest = ratio(sys.argv[1]), ratio(sys.argv[2])
print(f"[guest-check] limits cost a spawn x{host:.3f} on the host, x{guest:.3f} in the guest: "
      f"the guest's is {guest / host:.3f} of the host's (the target: at most 1.2)")
PYCODE
fi
grep -q '^FAIL' "$RESULTS/result" && die "guest checks failed (details in $RESULTS)"
grep -q '^DONE' "$RESULTS/result" || die "the guest stopped before its last check (serial log: $SERIAL)"
log "every guest check passed"
