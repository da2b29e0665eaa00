#!/usr/bin/env bash
# The whole test suite: lint, types, then every test against real services.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
echo "== ruff"; .venv/bin/ruff check . && .venv/bin/ruff format --check .
echo "== mypy --strict"; .venv/bin/mypy
# The Debian packages (tests/test_debs.py checks them, lintian included).
echo "== debs"; bash scripts/build-debs.sh --no-lintian
# tests/test_debs.py runs lintian and the packaged commands on Debian's python3.11;
# tests/test_deployed_backend.py boots a Debian 12 container (mmdebstrap, systemd-nspawn).
missing=()
command -v lintian >/dev/null 2>&1 || missing+=(lintian)
[ -x /usr/bin/python3.11 ] || missing+=(python3.11)
command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
command -v systemd-nspawn >/dev/null 2>&1 || missing+=(systemd-container)
if [ "${#missing[@]}" -gt 0 ]; then
    echo "test: apt-get install ${missing[*]}"
    . scripts/apt-install.sh
    apt_install "${missing[@]}"
fi
# A real board (issue 13): the agent .deb in a Debian 12 qemu guest, flashed over
# its UART, ACTIVE under systemd, with power cuts. Its image is cached outside the
# checkout; BOARD_VM=0 skips it (a quick local run).
if [ "${BOARD_VM:-1}" != 0 ]; then
    arch=$(dpkg --print-architecture)
    agent_deb=$(ls -t dist/provision-agent_*_"$arch".deb | head -1)
    server_deb=$(ls -t dist/provision-server_*_"$arch".deb | head -1)
    echo "== board VM ($agent_deb against $server_deb deployed as docs/server.md says)"
    bash scripts/board-vm.sh --backend deployed --agent-deb "$agent_deb" --server-deb "$server_deb"
fi
echo "== pytest"; .venv/bin/pytest "$@"
