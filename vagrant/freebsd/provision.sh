#!/bin/sh
# Runs as root in the FreeBSD 14 box (see Vagrantfile).
set -eu
cd /pyemperor

pkg install -y python311 py311-sqlite3 nginx curl
if [ ! -x /opt/pyemperor/bin/python3 ]; then
    python3.11 -m venv /opt/pyemperor
fi
/opt/pyemperor/bin/pip install -q --upgrade pip
/opt/pyemperor/bin/pip install -q -e '.[test]'

# rctl for the limits: takes effect after a reboot (vagrant reload).
grep -q '^kern.racct.enable=1' /boot/loader.conf || echo 'kern.racct.enable=1' >> /boot/loader.conf

# The suite: Linux-only tests (namespaces, cgroups, tun) are skipped here.
/opt/pyemperor/bin/ruff check .
/opt/pyemperor/bin/python -m pytest -q -p no:cacheprovider tests

# The emperor as a service, on the project's examples.
install -m 555 contrib/rc.d/pyemperor /usr/local/etc/rc.d/pyemperor
sysrc pyemperor_enable=YES pyemperor_dir=/pyemperor/examples/vassals
service pyemperor restart
for _ in $(jot 50); do
    curl -fs 127.0.0.1:8001 && break
    sleep 0.2
done
/opt/pyemperor/bin/emperorctl status
