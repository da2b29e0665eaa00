#!/usr/bin/env bash
# Deploys the backend on a Debian 12 system by running docs/server.md "Deploy" as written.
#
# usage: deploy-backend.sh [--print] [--deb-dir DIR] [--timeout SECONDS]
#
# The steps are not copied here: this script reads the first ```sh block under
# "## Deploy" in docs/server.md (beside it in a checkout, or /usr/share/doc/provision-server
# on a host with the package) and runs it with bash -euxo pipefail, as root, in
# --deb-dir (default: ./dist if it exists, else the current directory), where the
# provision-server .deb lies. The block's site lines (NAME=value before the first command)
# take the environment's value when one is set: MONGODB_URI, BROKER_NAME.
# Afterwards it waits until mosquitto.service and provision-server.service are active,
# the server's current run has logged event=started and is connected to the broker, and
# prints one line
#   deploy-backend: provision-server active (mosquitto as user mosquitto) in <s> s
# --print only prints the block as it would run (tests/test_deploy_doc.py reads it).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

print_only=0
deb_dir=""
timeout_s=60
while [ $# -gt 0 ]; do
    case "$1" in
        --print) print_only=1; shift ;;
        --deb-dir) deb_dir="${2:-}"; shift 2 ;;
        --timeout) timeout_s="${2:-}"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "deploy-backend: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

doc=""
for candidate in "$here/../docs/server.md" /usr/share/doc/provision-server/server.md; do
    if [ -f "$candidate" ]; then doc="$candidate"; break; fi
done
[ -n "$doc" ] || { echo "deploy-backend: docs/server.md not found" >&2; exit 1; }

# The first ```sh fence after "## Deploy", up to its closing fence.
block=$(awk '
    /^## / { in_section = ($0 == "## Deploy") }
    in_section && !done && /^```sh$/ { in_block = 1; next }
    in_block && /^```$/ { in_block = 0; done = 1 }
    in_block { print }
' "$doc")
[ -n "$block" ] || { echo "deploy-backend: no \`\`\`sh block under '## Deploy' in $doc" >&2; exit 1; }

# Site values: leading NAME=value lines, replaced by the environment's value if set.
script=""
site_done=0
while IFS= read -r line; do
    if [ "$site_done" -eq 0 ] && [[ "$line" =~ ^([A-Z_]+)=([^[:space:]]*) ]]; then
        name=${BASH_REMATCH[1]}
        if [ -n "${!name:-}" ]; then
            line="$name=$(printf '%q' "${!name}")    # from the environment"
        fi
    else
        site_done=1
    fi
    script+="$line"$'\n'
done <<< "$block"

if [ "$print_only" -eq 1 ]; then
    printf '%s' "$script"
    exit 0
fi

[ "$(id -u)" -eq 0 ] || { echo "deploy-backend: run as root (the doc's steps are)" >&2; exit 1; }
if [ -z "$deb_dir" ]; then
    if [ -d "$here/../dist" ]; then deb_dir="$here/../dist"; else deb_dir=$PWD; fi
fi
started=$(date +%s.%N)
since=$(date '+%Y-%m-%d %H:%M:%S')
echo "deploy-backend: running docs/server.md Deploy ($doc) in $deb_dir"
(cd "$deb_dir" && bash -euxo pipefail -c "$script")

# Ready: both units active, the server's current run has logged event=started and its
# latest broker event is a connect (a second run restarts Mosquitto, not the server).
server_ready() {
    systemctl is-active --quiet mosquitto.service provision-server.service || return 1
    local invocation events
    invocation=$(systemctl show -p InvocationID --value provision-server.service)
    [ -n "$invocation" ] || return 1
    events=$(journalctl "_SYSTEMD_INVOCATION_ID=$invocation" -o cat 2>/dev/null \
        | grep -o 'event=started\|event=broker-[a-z]*' || true)
    grep -q 'event=started' <<< "$events" \
        && [ "$(tail -1 <<< "$events")" = "event=broker-connect" ]
}
deadline=$(( $(date +%s) + timeout_s ))
until server_ready; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
        echo "deploy-backend: not running after ${timeout_s} s" >&2
        systemctl --no-pager status mosquitto.service provision-server.service >&2 || true
        journalctl --no-pager -u mosquitto.service -u provision-server.service \
            --since "$since" >&2 || true
        exit 1
    fi
    sleep 1
done
broker_user=$(stat -c %U "/proc/$(systemctl show -p MainPID --value mosquitto.service)")
if [ "$broker_user" != mosquitto ]; then
    echo "deploy-backend: mosquitto runs as '$broker_user', not as user mosquitto" >&2
    exit 1
fi
elapsed=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
echo "deploy-backend: provision-server active (mosquitto as user $broker_user) in $elapsed s"
