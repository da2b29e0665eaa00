#!/usr/bin/env bash
# Installs what the tests and the demo need on a fresh Debian machine:
# Debian's mosquitto (+ clients; gcc and mosquitto-dev build the broker plugin), a virtual
# environment in .venv with the package and its test/dev extras. Idempotent and quiet when
# all is there.
set -euo pipefail
cd "$(dirname "$0")/.."

. scripts/apt-install.sh

missing=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
command -v mosquitto_pub >/dev/null 2>&1 || missing+=(mosquitto-clients)
# promtool checks docs/prometheus-rules.yml (tests/test_prometheus_rules.py); its package
# only installs (no daemon starts where policy-rc.d forbids it, as in containers).
command -v promtool >/dev/null 2>&1 || missing+=(prometheus)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
# The broker's provisioning_guard plugin (server/broker/provisioning_guard.c) is compiled
# against Mosquitto's plugin headers.
command -v cc >/dev/null 2>&1 || missing+=(gcc libc6-dev)
[ -f /usr/include/mosquitto_broker.h ] || missing+=(mosquitto-dev)
[ -f /usr/include/mosquitto.h ] || missing+=(libmosquitto-dev)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "bootstrap: apt-get install ${missing[*]}"
    apt_install "${missing[@]}"
fi

if [ ! -x .venv/bin/python ]; then
    echo "bootstrap: creating .venv"
    python3 -m venv .venv
fi
echo "bootstrap: installing device-provisioning[dev] into .venv"
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev]' 2>&1 \
    | grep -v "^WARNING: Location" || true
.venv/bin/python -c 'import agent, server, pymongo, paho.mqtt' \
    || { echo "bootstrap: the package did not install" >&2; exit 1; }
