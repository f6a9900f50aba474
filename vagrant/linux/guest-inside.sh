#!/bin/bash
# Inside the guest of guest-check.sh (started by systemd at boot, as root):
# provisions the box with vagrant/linux/provision.sh from the host's wheels
# (which runs the suite, then the emperor on the examples under
# pyemperor.service), checks the shipped unit on cgroup v2 (tests/guest),
# runs bench/spawn.py, and writes one line per step to /mnt/results/result.
# The guest powers off when this ends (the unit's ExecStopPost).
set -uo pipefail
R=/mnt/results
# Emulated (TCG), the guest is several times slower than its host: the
# tests' bounds on waiting are stretched by that much.
scale=1
grep -q tcg "$R/accel" 2>/dev/null && scale=5
export PYEMPEROR_TIME_SCALE=${PYEMPEROR_TIME_SCALE:-$scale}
: > "$R/result"

say() { echo "$*" >> "$R/result"; echo "[guest] $*" > /dev/console; }
step() {  # step NAME COMMAND...: its output in NAME.log
    local name=$1 start=$SECONDS rc
    shift
    echo "[guest] $name: $*" > /dev/console
    "$@" > "$R/$name.log" 2>&1
    rc=$?
    if [ $rc = 0 ]; then
        say "PASS $name ($((SECONDS - start)) s)"
    else
        say "FAIL $name ($((SECONDS - start)) s, exit $rc): $(tail -3 "$R/$name.log" | tr '\n' ' ')"
    fi
    return $rc
}

facts() {
    echo "kernel: $(uname -r)"
    echo "init: $(systemctl --version | head -1)"
    echo "cgroup fs: $(stat -fc %T /sys/fs/cgroup)"
    echo "root controllers: $(cat /sys/fs/cgroup/cgroup.controllers)"
    echo "root subtree_control: $(cat /sys/fs/cgroup/cgroup.subtree_control)"
    echo "this step's cgroup: $(cat /proc/self/cgroup)"
    echo "cpus: $(nproc), memory: $(free -m | awk '/Mem:/ {print $2}') MB"
    echo "links: $(ip -o link | awk -F': ' '{print $2}' | tr '\n' ' ')"
    # What the guest is for: systemd on the unified hierarchy and nothing else.
    [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ] && [ ! -e /sys/fs/cgroup/unified ]
}

copy_checkout() {
    # The share is read-only; the box works in /pyemperor as Vagrant's rsync does.
    rm -rf /pyemperor
    mkdir -p /pyemperor
    tar -C /mnt/src --exclude=./.git --exclude='*.egg-info' --exclude=__pycache__ \
        --exclude=.pytest_cache --exclude=.hypothesis --exclude=./build --exclude=./dist -cf - . | tar -C /pyemperor -xf -
}

provision() {
    PYEMPEROR_WHEELS=$R/wheels PYEMPEROR_TESTS="$(cat "$R/pytest-args")" \
        bash /pyemperor/vagrant/linux/provision.sh
}

unit_checks() {
    cd /pyemperor && PYEMPEROR_GUEST_CHECK=1 /opt/pyemperor/bin/python -m pytest -v -p no:cacheprovider tests/guest
}

bench() {
    cd /pyemperor && /opt/pyemperor/bin/python bench/spawn.py --limits-only --samples 10 | tee "$R/bench-spawn.txt"
}

step facts facts
step copy copy_checkout && {
    step provision provision
    # provision.sh fails on a failed test but has installed by then.
    if [ -x /opt/pyemperor/bin/emperor ]; then
        step unit-v2 unit_checks
        step bench-spawn bench
    fi
}
journalctl -b --no-pager > "$R/journal.log" 2>&1
say DONE
sync
