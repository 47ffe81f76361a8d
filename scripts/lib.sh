# shellcheck shell=bash
# Shell functions shared by scripts/setup.sh and benches/compare.sh. Sourced, not run:
#
#   source "$ROOT/scripts/lib.sh"
#
# It only defines functions. They call the sourcing script's own `log` and `die`, which
# prefix each message with that script's name.

# apt_install PACKAGE...: installs these Debian packages (as root, non-interactive, without
# recommends), with one `apt-get update` first. Does nothing when no package is given, and
# fails (die) when not root. The caller decides what is missing.
apt_install() {
    (($#)) || return 0
    [[ $(id -u) -eq 0 ]] || die "missing packages ($*) and not root"
    log "installing $*"
    (
        export DEBIAN_FRONTEND=noninteractive
        # Keep the package scripts from starting services such as RabbitMQ or haproxy: the
        # scripts start their own, and containers have no init system. An existing
        # policy-rc.d is left as it is.
        policy=/usr/sbin/policy-rc.d
        if [[ ! -e $policy ]]; then
            printf '#!/bin/sh\nexit 101\n' >"$policy"
            chmod +x "$policy"
            trap 'rm -f "$policy"' EXIT
        fi
        apt-get update -q
        apt-get install -y -q --no-install-recommends "$@"
    )
}
