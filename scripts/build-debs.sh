#!/usr/bin/env bash
# Builds the two Debian 12 (bookworm) packages from this checkout:
#
#   dist/provision-agent_<version>_<arch>.deb    the board: /usr/bin/provision-agent, both
#                                                agent units, sysusers.d, /etc/provision-agent
#   dist/provision-server_<version>_<arch>.deb   the backend: provision-server, provision-station,
#                                                provision-server.service, default server.toml
#
# usage: bash scripts/build-debs.sh [--arch amd64|arm64] [--no-lintian]
#
# Each package carries a private Python environment under /usr/lib/<package> (a venv
# whose python is Debian's /usr/bin/python3 3.11) with the pinned wheels of
# packaging/requirements-*.txt: Debian 12's python3-paho-mqtt (1.6) and
# python3-cryptography (38) are too old, and a board has no network to pip from.
# The wheels are downloaded once per architecture into
# ${XDG_CACHE_HOME:-$HOME/.cache}/device-provisioning/wheels/ (outside the checkout);
# with the cache filled the build is offline. The agent package gets only the
# `agent` Python package; the server package gets `agent` and `server`. The
# development harness, tests and benchmarks are never packaged.
#
# Debian packages it needs, installed here when missing: dpkg-dev (dpkg-deb),
# lintian, python3-venv (a pip for the wheel download and the offline install),
# binutils (strip; binutils-aarch64-linux-gnu for --arch arm64), and for the broker's
# provisioning_guard plugin gcc, libc6-dev, mosquitto-dev, libmosquitto-dev (headers;
# gcc-aarch64-linux-gnu and libc6-dev-arm64-cross for --arch arm64). No fakeroot:
# dpkg-deb --root-owner-group; owners that are not root are set by the packages'
# sysusers.d/tmpfiles.d at install time.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

arch=""
run_lintian=1
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch="${2:-}"; shift 2 ;;
        --arch=*) arch="${1#--arch=}"; shift ;;
        --no-lintian) run_lintian=0; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "build-debs: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

. scripts/apt-install.sh
missing=()
command -v dpkg-deb >/dev/null 2>&1 && command -v dpkg-architecture >/dev/null 2>&1 \
    || missing+=(dpkg-dev)
[ "$run_lintian" -eq 0 ] || command -v lintian >/dev/null 2>&1 || missing+=(lintian)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
[ -n "$arch" ] || arch=$(dpkg --print-architecture)
strip=strip
[ "$arch" != arm64 ] || [ "$(dpkg --print-architecture)" = arm64 ] \
    || strip=aarch64-linux-gnu-strip
if ! command -v "$strip" >/dev/null 2>&1; then
    [ "$strip" = strip ] && missing+=(binutils) || missing+=(binutils-aarch64-linux-gnu)
fi
# The broker plugin is C, compiled here so that the backend host needs no compiler.
guard_source=server/broker/provisioning_guard.c
# All of guard_plugin.py's SOURCES (the headers beside them are found by #include "...").
guard_sources=("$guard_source" server/broker/guard_control.c server/broker/device_rights.c)
cc=gcc
[ "$arch" != arm64 ] || [ "$(dpkg --print-architecture)" = arm64 ] || cc=aarch64-linux-gnu-gcc
if [ -f "$guard_source" ]; then
    if ! command -v "$cc" >/dev/null 2>&1; then
        [ "$cc" = gcc ] && missing+=(gcc libc6-dev) || missing+=(gcc-aarch64-linux-gnu)
    fi
    # The cross compiler's libc headers are only a Recommends of gcc-aarch64-linux-gnu.
    [ "$cc" = gcc ] || [ -f /usr/aarch64-linux-gnu/include/stdio.h ] \
        || missing+=(libc6-dev-arm64-cross)
    [ -f /usr/include/mosquitto_broker.h ] || missing+=(mosquitto-dev)
    [ -f /usr/include/mosquitto.h ] || missing+=(libmosquitto-dev)
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "build-debs: apt-get install ${missing[*]}"
    apt_install "${missing[@]}"
fi

case "$arch" in
    amd64) wheel_platforms=(manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64) ;;
    arm64) wheel_platforms=(manylinux_2_28_aarch64 manylinux_2_17_aarch64 manylinux2014_aarch64) ;;
    *) echo "build-debs: --arch must be amd64 or arm64, not '$arch'" >&2; exit 2 ;;
esac

# Debian 12's interpreter: the bundled C extensions (cffi, pymongo) are cp311 builds.
PY_VERSION=3.11
version=$(python3 -c 'import tomllib,sys; print(tomllib.load(open("pyproject.toml","rb"))["project"]["version"])')
# Reproducible file times: the last commit, not the wall clock.
export SOURCE_DATE_EPOCH="${SOURCE_DATE_EPOCH:-$(git log -1 --format=%ct 2>/dev/null || date +%s)}"

cache="${XDG_CACHE_HOME:-$HOME/.cache}/device-provisioning"
tool_venv="$cache/pip-venv"
wheels="$cache/wheels/cp311-$arch"
if [ ! -x "$tool_venv/bin/pip" ]; then
    python3 -m venv "$tool_venv"
fi
# Only the cache and the registry: no find-links of this machine (PIP_FIND_LINKS).
pip=(env -u PIP_FIND_LINKS "$tool_venv/bin/pip" --disable-pip-version-check -q)
run_pip() {  # pip without the noise of index locations that this machine's pip.conf lists
    local log status=0
    log=$(mktemp)
    "${pip[@]}" "$@" 2>"$log" || status=$?
    grep -v '^WARNING: Location' "$log" >&2 || true
    rm -f "$log"
    return "$status"
}
platform_args=(--only-binary=:all: --python-version "$PY_VERSION" --implementation cp
               --abi cp311 --abi abi3 --abi none)
for p in "${wheel_platforms[@]}"; do platform_args+=(--platform "$p"); done

# --- wheels: fetched once per set of pins, then offline ------------------------------
pins_key=$(cat packaging/requirements-agent.txt packaging/requirements-server.txt \
    | sha256sum | cut -c1-16)
if [ ! -e "$wheels/.complete-$pins_key" ]; then
    echo "build-debs: downloading wheels for $arch into $wheels"
    mkdir -p "$wheels"
    run_pip download --dest "$wheels" --no-deps "${platform_args[@]}" \
        -r packaging/requirements-server.txt
    touch "$wheels/.complete-$pins_key"
fi

build="$ROOT/build/deb-$arch"
rm -rf "$build"
mkdir -p "$build" dist

# A venv tree for Debian's python3, written by hand (so an arm64 one can be built on
# amd64): pyvenv.cfg + bin/python3 -> /usr/bin/python3 + lib/python3.11/site-packages.
make_private_env() {  # <package root> <prefix, e.g. /usr/lib/provision-agent> <requirements>
    local root=$1 prefix=$2 requirements=$3
    local env="$root$prefix" site="$root$prefix/lib/python$PY_VERSION/site-packages"
    mkdir -p "$env/bin" "$site"
    printf 'home = /usr/bin\ninclude-system-site-packages = false\nversion = %s\n' \
        "$PY_VERSION" > "$env/pyvenv.cfg"
    ln -s ../../../bin/python3 "$env/bin/python3"
    run_pip install --no-index --find-links "$wheels" --no-deps --no-compile \
        --target "$site" "${platform_args[@]}" -r "$requirements"
    rm -rf "$site/bin"   # console scripts of the wheels (pyserial's miniterm...)
    # As dh_strip and dh_python3 would: no debug symbols in the extension modules,
    # no "#!python" lines in modules that are not executable.
    find "$site" -name '*.so' -exec "$strip" --strip-unneeded -R .comment -R .note {} + -exec chmod 0644 {} +
    find "$site" -name '*.py' ! -perm -u+x -exec sed -i '1s/^#!.*/#/' {} +
    # importlib.metadata.version("device-provisioning") for `--version`.
    local meta="$site/device_provisioning-$version.dist-info"
    mkdir -p "$meta"
    printf 'Metadata-Version: 2.1\nName: device-provisioning\nVersion: %s\n' "$version" \
        > "$meta/METADATA"
    printf 'debian\n' > "$meta/INSTALLER"
}

copy_python_package() {  # <package root> <prefix> <python package dir>...
    local root=$1 prefix=$2
    shift 2
    local site="$root$prefix/lib/python$PY_VERSION/site-packages"
    local pkg
    for pkg in "$@"; do
        (cd "$ROOT" && git ls-files -- "$pkg" | grep '\.py$' || true) | while read -r file; do
            install -D -m 0644 "$ROOT/$file" "$site/$file"
        done
    done
}

entry_point() {  # <package root> <command from pyproject's [project.scripts]> <prefix>
    local root=$1 command=$2 prefix=$3
    local target module function
    target=$(python3 -c 'import sys, tomllib
print(tomllib.load(open("pyproject.toml", "rb"))["project"]["scripts"][sys.argv[1]])' "$command")
    module=${target%%:*}
    function=${target#*:}
    install -d "$root/usr/bin"
    # The private environment's python (a venv: sys.executable stays inside it, so the
    # agent's re-exec of `python -m agent run` finds the same packages). -P: never
    # import from the current directory.
    cat > "$root/usr/bin/$command" <<EOF
#!/bin/sh
# $command: $module.$function() in the package's private Python environment ($prefix).
exec $prefix/bin/python3 -P -c 'import sys; from $module import $function; sys.exit($function(prog_name="$command"))' "\$@"
EOF
    chmod 0755 "$root/usr/bin/$command"
}

docs_and_changelog() {  # <package root> <package> <doc file>...
    local root=$1 package=$2
    shift 2
    local doc="$root/usr/share/doc/$package"
    install -d "$doc"
    install -m 0644 packaging/deb/copyright "$doc/copyright"
    local file
    for file in "$@"; do
        install -m 0644 "$file" "$doc/$(basename "$file")"
    done
    local date
    date=$(date -u -R -d "@$SOURCE_DATE_EPOCH")
    {
        echo "$package ($version) unstable; urgency=medium"
        echo
        echo "  * Built from device-provisioning $(git describe --always --dirty 2>/dev/null || echo unknown)."
        echo
        echo " -- Device provisioning team <provisioning@example.com>  $date"
    } | gzip -9n > "$doc/changelog.gz"
    touch -d "@$SOURCE_DATE_EPOCH" "$doc/changelog.gz"
}

finish_package() {  # <package root> <package dir in packaging/deb>
    local root=$1 src=$2
    local package
    package=$(basename "$src")
    install -d "$root/DEBIAN"
    local script
    for script in preinst postinst prerm postrm; do
        [ ! -e "$src/$script" ] || install -m 0755 "$src/$script" "$root/DEBIAN/$script"
    done
    [ ! -e "$src/conffiles" ] || install -m 0644 "$src/conffiles" "$root/DEBIAN/conffiles"
    install -d "$root/usr/share/lintian/overrides"
    install -m 0644 "$src/lintian-overrides" "$root/usr/share/lintian/overrides/$package"
    find "$root" -name __pycache__ -prune -exec rm -rf {} +
    local size
    size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
    sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
        "$src/control" > "$root/DEBIAN/control"
    (cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z \
        | xargs -0 md5sum) > "$root/DEBIAN/md5sums"
    chmod 0644 "$root/DEBIAN/md5sums"
    # Directories 0755, files 0644 unless executable (umask of the build host aside).
    find "$root" -type d -exec chmod 0755 {} +
    find "$root" -type f ! -perm -u+x -exec chmod 0644 {} +
    find "$root" -type f -perm -u+x -exec chmod 0755 {} +
    find "$root" -exec touch -h -d "@$SOURCE_DATE_EPOCH" {} +
    local deb="dist/${package}_${version}_${arch}.deb"
    dpkg-deb --root-owner-group -Zxz --build "$root" "$deb" >/dev/null
    echo "build-debs: wrote $deb ($(du -h "$deb" | cut -f1))"
}

build_guard_plugin() {  # <output .so>
    local output=$1 include cflags
    # Only Mosquitto's own headers from the host (arch-independent); libc's come from the
    # compiler's target, so an arm64 plugin never sees x86 headers.
    include=$(mktemp -d)
    cp /usr/include/mosquitto.h /usr/include/mosquitto_broker.h /usr/include/mosquitto_plugin.h \
        "$include/"
    [ ! -f /usr/include/mqtt_protocol.h ] || cp /usr/include/mqtt_protocol.h "$include/"
    # The flags the server's own build uses (server/broker/guard_plugin.py, CFLAGS).
    cflags=$(python3 -c 'import ast, sys
for node in ast.parse(open(sys.argv[1]).read()).body:
    if isinstance(node, ast.AnnAssign) and getattr(node.target, "id", "") == "CFLAGS":
        print(" ".join(ast.literal_eval(node.value)))' server/broker/guard_plugin.py)
    [ -n "$cflags" ] || { echo "build-debs: no CFLAGS in server/broker/guard_plugin.py" >&2; exit 1; }
    # shellcheck disable=SC2086  # the flags are words
    "$cc" $cflags -I"$include" -o "$output" "${guard_sources[@]}"
    rm -rf "$include"
    "$strip" --strip-unneeded -R .comment -R .note "$output"
    chmod 0644 "$output"
}

# --- provision-agent ---------------------------------------------------------------
agent_root="$build/provision-agent"
agent_prefix=/usr/lib/provision-agent
make_private_env "$agent_root" "$agent_prefix" packaging/requirements-agent.txt
copy_python_package "$agent_root" "$agent_prefix" agent
entry_point "$agent_root" provision-agent "$agent_prefix"
install -d "$agent_root/lib/systemd/system"
install -m 0644 systemd/provision-agent.service systemd/provision-factory-console.service \
    "$agent_root/lib/systemd/system/"
install -D -m 0644 packaging/deb/provision-agent/sysusers.conf \
    "$agent_root/usr/lib/sysusers.d/provision-agent.conf"
install -D -m 0644 packaging/deb/provision-agent/tmpfiles.conf \
    "$agent_root/usr/lib/tmpfiles.d/provision-agent.conf"
docs_and_changelog "$agent_root" provision-agent docs/systemd.md docs/agent-config.md \
    docs/agent.md hw/README.md
finish_package "$agent_root" packaging/deb/provision-agent

# --- provision-server ----------------------------------------------------------------
server_root="$build/provision-server"
server_prefix=/usr/lib/provision-server
make_private_env "$server_root" "$server_prefix" packaging/requirements-server.txt
copy_python_package "$server_root" "$server_prefix" agent server
entry_point "$server_root" provision-server "$server_prefix"
entry_point "$server_root" provision-station "$server_prefix"
if [ -f "$guard_source" ]; then
    # broker-config --guard-plugin /usr/lib/provision-server/provisioning_guard.so (docs/server.md)
    build_guard_plugin "$server_root$server_prefix/provisioning_guard.so"
fi
install -d "$server_root/lib/systemd/system"
install -m 0644 systemd/provision-server.service "$server_root/lib/systemd/system/"
install -D -m 0644 packaging/deb/provision-server/sysusers.conf \
    "$server_root/usr/lib/sysusers.d/provision-server.conf"
install -D -m 0644 packaging/deb/provision-server/tmpfiles.conf \
    "$server_root/usr/lib/tmpfiles.d/provision-server.conf"
install -D -m 0644 packaging/deb/provision-server/server.toml \
    "$server_root/etc/provision-server/server.toml"
docs_and_changelog "$server_root" provision-server docs/server.md docs/systemd.md \
    docs/broker.md docs/schema.md docs/factory.md
finish_package "$server_root" packaging/deb/provision-server

if [ "$run_lintian" -eq 1 ]; then
    echo "build-debs: lintian"
    lintian --fail-on error,warning --tag-display-limit 0 \
        "dist/provision-agent_${version}_${arch}.deb" \
        "dist/provision-server_${version}_${arch}.deb"
fi
