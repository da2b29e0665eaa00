# Sourced by the scripts that install Debian packages they need (bootstrap, build-debs,
# test, board-vm): one way to call apt-get, quiet, with an index update only when the
# first try fails (a fresh machine's empty package lists).
apt_install() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1 || {
        $sudo apt-get update -q >/dev/null
        $sudo apt-get install -y -q --no-install-recommends "$@" >/dev/null
    }
}
