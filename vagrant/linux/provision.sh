#!/bin/bash
# Runs as root in the Debian 12 box (see Vagrantfile).
set -euo pipefail
cd /pyemperor

# Everything the tests need, then the whole suite (as CI does).
PYEMPEROR_IN_BOX=1 bash .ci/run

# The emperor as a service, on the project's examples.
install -m 644 contrib/systemd/pyemperor.service /etc/systemd/system/pyemperor.service
mkdir -p /etc/systemd/system/pyemperor.service.d /etc/vassals
cat > /etc/systemd/system/pyemperor.service.d/examples.conf <<'CONF'
[Service]
ExecStart=
ExecStart=/opt/pyemperor/bin/emperor --emperor-pidfile /run/pyemperor.pid /pyemperor/examples/vassals
CONF
systemctl daemon-reload
systemctl enable --now pyemperor
for _ in $(seq 1 50); do
    curl -fs 127.0.0.1:8001 && break
    sleep 0.2
done
/opt/pyemperor/bin/emperorctl status
