#!/usr/bin/env bash
# A second, independent RabbitMQ node that validates JWTs itself with
# rabbitmq_auth_backend_oauth2: the reference the conformance harness
# (tests/python/test_conformance.py) compares the gateway with.
#
#   scripts/reference-node.sh start     start it (idempotent: a running node with the same
#                                       configuration is kept, a different one restarted)
#   scripts/reference-node.sh stop      stop it (idempotent) and wait until the VM has exited
#   scripts/reference-node.sh status    exit 0 when it runs and answers
#   scripts/reference-node.sh ctl ARGS  rabbitmqctl against it (e.g. `ctl eval 'node().'`)
#   scripts/reference-node.sh env       print the settings below, resolved
#   scripts/reference-node.sh foreground  run it in the foreground (boot errors are shown)
#
# It uses the same Debian rabbitmq-server package as the default node, and leaves that node
# (rabbit@<host>, AMQP 5672, distribution 25672, /var/lib/rabbitmq) alone:
#   - its own node name `rabbit_conformance@localhost` ("localhost" always resolves, the
#     machine's host name may not on a CI runner);
#   - its own ports: AMQP 127.0.0.1:5691, Erlang distribution 25691, management API
#     127.0.0.1:15691; EPMD (4369) is shared, which Erlang supports (whichever node starts
#     first starts epmd);
#   - its own Erlang cookie: HOME is the state directory, where this script writes
#     .erlang.cookie (mode 0400) before the node or rabbitmqctl can invent one;
#   - its own mnesia, logs, rabbitmq.conf, advanced.config, enabled_plugins and
#     rabbitmq-env.conf (empty, so /etc/rabbitmq/rabbitmq-env.conf is not inherited), all in
#     the state directory, by default target/reference-node;
#   - it runs the real scripts in /usr/lib/rabbitmq/bin as the invoking user (the /usr/sbin
#     wrappers su to `rabbitmq` and would use /var/lib/rabbitmq's cookie), so as root no file
#     has to be readable by the rabbitmq user;
#   - the soft open-file limit is lowered to 65536 for the node: Erlang sizes its port table
#     from it, and CI containers often allow 2^30 files, which makes the VM slow to boot and
#     hungry for memory.
# Configuration: auth_backends.1 = rabbit_auth_backend_oauth2 then auth_backends.2 = internal
# (Amazon MQ's chain: tokens first, then the internal users; `guest` may log in from loopback
# only), resource_server_id = rabbitmq, and in advanced.config a static
# RS256 key: tests/fixtures/rsa-public.pem as kid `test-rsa` (also the default key for
# tokens without a kid), RS256 only. rabbitmq_management is enabled too (the session fuzzer,
# tests/python/session_fuzz, creates a vhost per sequence and reads the broker state there);
# oauth2 being its first auth backend, the API takes HTTP basic auth with any user name and a
# token as the password (rabbitmq.tag:administrator for vhost management), or an internal
# user's password. AMQP behaviour is
# the same as without it. The profile (REFERENCE_NODE_PROFILE) adds:
#   base     additional_scopes_key = https://sts.amazonaws.com/ (a top-level claim in 3.10.8)
#   aliases  the scope aliases of the conformance cases, no additional_scopes_key
#   plain    neither
#   backend  internal users instead of OAuth 2.0 (a plain second node for failover tests)
# The harness switches profiles at run time with `ctl eval` (application:set_env), which the
# 3.10.8 plugin reads on every login; the profile here is only the boot-time one.
#
# Settings (environment, all optional):
#   REFERENCE_NODE_STATE      state directory               [<repo>/target/reference-node]
#   REFERENCE_NODE_NAME       node name                     [rabbit_conformance@localhost]
#   REFERENCE_NODE_PORT       AMQP port (127.0.0.1)         [5691]
#   REFERENCE_NODE_DIST_PORT  distribution port             [25691]
#   REFERENCE_NODE_MGMT_PORT  management API port (127.0.0.1) [15691]
#   REFERENCE_NODE_PROFILE    base | aliases | plain | backend  [base]
#   REFERENCE_NODE_TIMEOUT    seconds to wait for start/stop [60]
#   REFERENCE_NODE_REMOTE_ADDRESS  a non-loopback address of this machine the node also
#                             listens on (AMQP, same port), so that a client can reach it
#                             from a source RabbitMQ does not count as loopback (its
#                             loopback_users check reads the listener's address)
#                             [the first global IPv4 address `ip` reports; none: `none`]
#   REFERENCE_NODE_TLS        PORT:DIR, an AMQPS listener on 127.0.0.1:PORT with DIR's ca.pem,
#                             server.pem and server-key.pem (no client certificates); the
#                             benchmark's RabbitMQ-TLS path                               [none]
#   RABBITMQ_SBIN             the real (non-wrapper) scripts [/usr/lib/rabbitmq/bin]
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

STATE="${REFERENCE_NODE_STATE:-$ROOT/target/reference-node}"
NODE="${REFERENCE_NODE_NAME:-rabbit_conformance@localhost}"
PORT="${REFERENCE_NODE_PORT:-5691}"
DIST="${REFERENCE_NODE_DIST_PORT:-25691}"
MGMT="${REFERENCE_NODE_MGMT_PORT:-15691}"
PROFILE="${REFERENCE_NODE_PROFILE:-base}"
TIMEOUT="${REFERENCE_NODE_TIMEOUT:-60}"
if [[ -z "${REFERENCE_NODE_REMOTE_ADDRESS:-}" ]]; then
    REFERENCE_NODE_REMOTE_ADDRESS="$(ip -4 -o addr show scope global 2>/dev/null | awk '{ split($4, a, "/"); print a[1]; exit }')"
fi
REMOTE="${REFERENCE_NODE_REMOTE_ADDRESS:-none}"
TLS="${REFERENCE_NODE_TLS:-none}"
SBIN="${RABBITMQ_SBIN:-/usr/lib/rabbitmq/bin}"
KEY="$ROOT/tests/fixtures/rsa-public.pem"
KID="test-rsa"
PIDFILE="$STATE/node.pid"

log() { echo "reference-node: $*" >&2; }
die() { echo "reference-node: error: $*" >&2; exit 1; }

[[ "$STATE" = /* ]] || STATE="$ROOT/$STATE"

# Everything the node and rabbitmqctl read from the environment is set here; nothing is
# inherited from the caller's RABBITMQ_* variables.
node_env() {
    local v
    for v in $(compgen -e); do
        case "$v" in RABBITMQ_SBIN) ;; RABBITMQ_* | ERL_* ) unset "$v" ;; esac
    done
    export HOME="$STATE"
    export RABBITMQ_NODENAME="$NODE"
    export RABBITMQ_NODE_IP_ADDRESS=127.0.0.1
    export RABBITMQ_NODE_PORT="$PORT"
    export RABBITMQ_DIST_PORT="$DIST"
    export RABBITMQ_CONF_ENV_FILE="$STATE/rabbitmq-env.conf"
    export RABBITMQ_CONFIG_FILE="$STATE/rabbitmq.conf"
    export RABBITMQ_ADVANCED_CONFIG_FILE="$STATE/advanced.config"
    export RABBITMQ_ENABLED_PLUGINS_FILE="$STATE/enabled_plugins"
    export RABBITMQ_MNESIA_BASE="$STATE/mnesia"
    export RABBITMQ_LOG_BASE="$STATE/log"
    export RABBITMQ_PID_FILE="$PIDFILE"
    export ERL_CRASH_DUMP="$STATE/erl_crash.dump"
    # Erlang distribution on loopback only (RABBITMQ_NODE_IP_ADDRESS covers AMQP only).
    export RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}"
}

# rabbitmqctl against the node, bounded by CTL_TIMEOUT seconds.
ctl() {
    (node_env && cd "$STATE" && exec timeout "${CTL_TIMEOUT:-$TIMEOUT}" "$SBIN/rabbitmqctl" -n "$NODE" "$@")
}

# The node answers (not just: a VM with that name exists).
running() { CTL_TIMEOUT=15 ctl -q await_startup --timeout 5 >/dev/null 2>&1; }

node_pid() {
    if [[ -s "$PIDFILE" ]]; then
        cat "$PIDFILE"
        return
    fi
    # The pid file can be gone while the node runs (a stop that overlapped a start removed
    # it): ask the node itself, or it could never be stopped by this script.
    CTL_TIMEOUT=10 ctl -q eval 'os:getpid().' 2>/dev/null | tr -dc '0-9' || true
}

render() {
    mkdir -p "$STATE/log" "$STATE/new"
    local new="$STATE/new"
    cat >"$new/rabbitmq.conf" <<EOF
## Generated by scripts/reference-node.sh: RabbitMQ with rabbitmq_auth_backend_oauth2 then the
## internal users, for the conformance harness. Do not edit.
listeners.tcp.1 = 127.0.0.1:$PORT
auth_backends.1 = rabbit_auth_backend_oauth2
auth_backends.2 = internal
auth_oauth2.resource_server_id = rabbitmq
management.tcp.ip = 127.0.0.1
management.tcp.port = $MGMT
log.file.level = info
log.console = false
EOF
    [[ "$REMOTE" != none ]] && echo "listeners.tcp.2 = $REMOTE:$PORT" >>"$new/rabbitmq.conf"
    if [[ "$TLS" != none ]]; then
        local tls_port="${TLS%%:*}" tls_dir="${TLS#*:}"
        [[ -r "$tls_dir/server-key.pem" ]] || die "REFERENCE_NODE_TLS: no $tls_dir/server-key.pem"
        printf '%s\n' "listeners.ssl.default = 127.0.0.1:$tls_port" \
            "ssl_options.cacertfile = $tls_dir/ca.pem" \
            "ssl_options.certfile = $tls_dir/server.pem" \
            "ssl_options.keyfile = $tls_dir/server-key.pem" \
            "ssl_options.verify = verify_none" \
            "ssl_options.fail_if_no_peer_cert = false" >>"$new/rabbitmq.conf"
    fi
    [[ "$PROFILE" == base ]] &&
        echo "auth_oauth2.additional_scopes_key = https://sts.amazonaws.com/" >>"$new/rabbitmq.conf"
    # `backend`: an ordinary node with internal users (guest from loopback), used as a second
    # backend node of the gateway in the failover test.
    [[ "$PROFILE" == backend ]] &&
        sed -i -e 's/^auth_backends.1 = rabbit_auth_backend_oauth2$/auth_backends.1 = internal/' \
            -e '/^auth_backends.2 = internal$/d' "$new/rabbitmq.conf"

    local pem aliases=""
    [[ -r "$KEY" ]] || die "$KEY is not readable"
    pem="$(cat "$KEY")"
    if [[ "$PROFILE" == aliases ]]; then
        # Keep in sync with ALIASES in tests/python/test_conformance.py (it also sets them
        # at run time). Aliases expand to prefixed scopes: the prefix filter runs after.
        aliases=',
    {scope_aliases, #{
        <<"reader-alias">> => [<<"rabbitmq.read:*/*">>],
        <<"arn:aws:iam::111122223333:role/Reader">> => [<<"rabbitmq.read:*/*">>],
        <<"arn:aws:iam::111122223333:role/Admin">> => [<<"rabbitmq.read:*/*">>,
            <<"rabbitmq.write:*/*">>, <<"rabbitmq.configure:*/*">>]
    }}'
    fi
    cat >"$new/advanced.config" <<EOF
%% Generated by scripts/reference-node.sh (profile $PROFILE). Do not edit.
%% The signing key is tests/fixtures/rsa-public.pem, kid $KID, also the default key.
[
  {rabbitmq_auth_backend_oauth2, [
    {key_config, [
        {default_key, <<"$KID">>},
        {signing_keys, #{<<"$KID">> => {pem, <<"$pem
">>}}},
        {algorithms, [<<"RS256">>]}
    ]}$aliases
  ]}
].
EOF
    echo "[rabbitmq_auth_backend_oauth2,rabbitmq_management]." >"$new/enabled_plugins"
    : >"$new/rabbitmq-env.conf"
    echo "$NODE $PORT $DIST $MGMT" >"$new/identity"
}

# The rendered files differ from the ones the running node booted with.
config_changed() {
    local f
    for f in rabbitmq.conf advanced.config enabled_plugins identity; do
        cmp -s "$STATE/new/$f" "$STATE/$f" || return 0
    done
    return 1
}

write_cookie() {
    local cookie="$STATE/.erlang.cookie"
    if [[ ! -s "$cookie" ]]; then
        # shellcheck disable=SC2019 # ASCII capitals exactly (LC_ALL=C), as Erlang writes them
        (umask 077 && LC_ALL=C tr -dc 'A-Z' </dev/urandom | head -c 20 >"$cookie")
    fi
    chmod 400 "$cookie"
}

do_stop() {
    local pid
    pid="$(node_pid)"
    if [[ -z "$pid" ]] && ! running; then
        return 0
    fi
    log "stopping $NODE"
    [[ -s "$PIDFILE" || -z "$pid" ]] || echo "$pid" >"$PIDFILE"
    # `stop <pidfile>` waits until that VM has exited.
    if ! ctl -q stop --idempotent "$PIDFILE" >/dev/null 2>&1; then
        pid="$(node_pid)"
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            log "rabbitmqctl stop failed; killing pid $pid"
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            kill -9 "$pid" 2>/dev/null || true
        fi
    fi
    rm -f "$PIDFILE"
}

do_start() {
    command -v "$SBIN/rabbitmq-server" >/dev/null 2>&1 ||
        die "$SBIN/rabbitmq-server not found (apt-get install rabbitmq-server; scripts/setup.sh does)"
    mkdir -p "$STATE"
    render
    if running; then
        if ! config_changed; then
            log "$NODE already running on 127.0.0.1:$PORT (profile $PROFILE)"
            return 0
        fi
        log "$NODE runs with another configuration: restarting"
        do_stop
    else
        # A node that died leaves a pid file (and maybe a VM that does not answer).
        do_stop
    fi
    local f
    for f in rabbitmq.conf advanced.config enabled_plugins rabbitmq-env.conf identity; do
        mv -f "$STATE/new/$f" "$STATE/$f"
    done
    # A fresh database each time: no queues, exchanges or feature flags left over.
    rm -rf "$STATE/mnesia" "$STATE/erl_crash.dump"
    mkdir -p "$STATE/mnesia" "$STATE/log"
    write_cookie

    log "starting $NODE on 127.0.0.1:$PORT (distribution $DIST, profile $PROFILE, state $STATE)"
    local t0=$SECONDS
    (
        node_env
        cd "$STATE"
        hard="$(ulimit -Hn)"
        if [[ "$hard" == unlimited || "$hard" -gt 65536 ]]; then ulimit -Sn 65536; else ulimit -Sn "$hard"; fi
        # -detached: the VM daemonises; its output goes to the log directory.
        "$SBIN/rabbitmq-server" -detached >"$STATE/log/startup.out" 2>&1
    ) || die "rabbitmq-server -detached failed: $(cat "$STATE/log/startup.out")"

    # await_startup fails at once until the node is registered with epmd: poll it.
    local deadline=$((SECONDS + TIMEOUT))
    until running; do
        if [[ -f "$STATE/erl_crash.dump" ]]; then
            die "$NODE crashed while booting ($(grep -m1 '^Slogan' "$STATE/erl_crash.dump")); \
'$0 foreground' shows the reason (e.g. an unknown rabbitmq.conf key)"
        fi
        if ((SECONDS >= deadline)); then
            do_stop || true
            die "$NODE did not start within ${TIMEOUT} s; see $STATE/log/"
        fi
        sleep 0.25
    done
    log "$NODE up after $((SECONDS - t0)) s"
}

case "${1:-}" in
start) do_start ;;
stop) mkdir -p "$STATE"; do_stop ;;
status) running ;;
foreground) # for debugging a node that does not boot: its errors go to the terminal
    do_stop; render
    for f in rabbitmq.conf advanced.config enabled_plugins rabbitmq-env.conf identity; do
        mv -f "$STATE/new/$f" "$STATE/$f"
    done
    write_cookie; node_env; cd "$STATE"; exec "$SBIN/rabbitmq-server" ;;
ctl) shift; mkdir -p "$STATE"; ctl "$@" ;;
env) printf 'STATE=%s\nNODE=%s\nPORT=%s\nDIST=%s\nMGMT=%s\nPROFILE=%s\nREMOTE=%s\n' "$STATE" "$NODE" "$PORT" "$DIST" "$MGMT" "$PROFILE" "$REMOTE" ;;
*) echo "usage: $0 start|stop|status|ctl ARGS...|env" >&2; exit 2 ;;
esac
