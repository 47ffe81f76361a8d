#!/usr/bin/env bash
# The end-to-end comparison: the same workloads, in one run, against the same RabbitMQ node
#   (a) direct      amqp://guest:guest@127.0.0.1:5695    plain AMQP, no proxy
#   (b) haproxy     amqps://guest:guest@localhost:5696   HAProxy terminating TLS, TCP mode
#   (c) gateway     amqps://@localhost:5697 + token      the gateway: TLS, JWT, authorisation
#   (d) gateway-tokens  amqps://@localhost:5700 + token  the same, with backend tokens
#                                                        (backend.auth = "token": RabbitMQ's
#                                                        OAuth 2.0 plugin checks every
#                                                        operation again)
#   (e) rabbitmq-tls    amqps://@localhost:5702 + token  RabbitMQ's own TLS listener, its
#                                                        OAuth 2.0 plugin verifying the same
#                                                        token (the emulator's ES384 key, the
#                                                        role alias, additional_scopes_key sub)
# then a table of medians and ratios against the targets of the performance issue
# (throughput >= 1.05x HAProxy and >= 1.3x RabbitMQ's own TLS, >= 0.9x direct at 1 KiB;
# churn >= 1.05x HAProxy and >= 1.5x RabbitMQ's TLS, backend tokens costing <= 10 % of it;
# p50 latency <= HAProxy's, <= RabbitMQ TLS's and <= 1.3x direct, p99 <= HAProxy's; <= 24 KiB
# of gateway RSS per idle connection). Earlier runs in docs/performance.md were judged
# against the older targets their tables name.
#
#   benches/compare.sh              full run (3 interleaved repetitions, 10 s each: ~12 min)
#   benches/compare.sh --smoke      seconds: every cell must get a number, ratios not judged
#
# Options:
#   --reps N            repetitions of each workload (direct, haproxy, gateway in turn)  [3]
#   --duration S        seconds per throughput, latency and churn run                    [10]
#   --warmup S          seconds excluded at the start of each throughput run              [1]
#   --idle N            connections held open by the idle workload; lowered to what the
#                       open-file hard limit lets a proxy hold (two sockets each)       [10000]
#   --sweep LIST        connection-count sweep points: producer-consumer pairs, each pair
#                       on a queue of its own (2N connections)                [1,10,100,1000]
#   --threads N         HAProxy nbthread and the gateway's tokio worker threads
#                       [HAProxy: nproc, its default; the gateway: its own default,
#                       one worker per CPU and one on 2 CPUs or fewer]
#   --workloads LIST    comma-separated subset of: idle,1KiB,1KiB-confirms,16B,64KiB,latency,churn,
#                       churn-distinct (churn where every gateway connection presents a token
#                       the gateway has not seen: no verified-token cache hit, one signature
#                       check per connection; direct and HAProxy run plain churn),
#                       100x100 (100 producers and 100 consumers on 100 queues, 1 KiB,
#                       confirms with 64 in flight per producer), sweep (the same shape at
#                       each --sweep point: how throughput per connection falls as
#                       connections are added; plotted as SVG by the report)
#   --debug             use the debug build instead of the release build
#   --keep-node         leave the benchmark RabbitMQ node running at the end
#   --smoke             1 rep, 0.5 s throughput runs after 0.25 s of warm-up, 1 s of churn,
#                       200 idle connections held 1 s, sweep points 1 and 10, debug build (CI: test.sh has built
#                       it): under a minute with the node start; exit non-zero only if a
#                       run failed or a cell got no number
# Environment: GATEWAY_THREADS=N runs the gateways with N tokio worker threads whatever
#   --threads says (HAProxy keeps --threads); GATEWAY_THREADS=default leaves them to the
#   gateway's own default.
# Environment: GATEWAY_PER_CORE=true runs the gateways with [runtime] per_core = true
#   (single-threaded runtimes, connections handed off by the acceptor).
# Environment: GATEWAY_BUSY_POLL_US=N runs the gateways with [runtime] busy_poll_us = N
#   (bounded busy polling; default 0, off).
# Environment: LOADGEN=PATH runs that load generator (same CLI) instead of building
# examples/loadgen.
#
# What it does, all on loopback, every process it starts stopped on exit:
#   1. installs haproxy, openssl, python3 and rabbitmq-server when missing (Debian, as root);
#      builds the gateway and the load generator (examples/loadgen.rs);
#   2. starts a RabbitMQ node of its own, rabbit_bench@localhost on 5695, with
#      scripts/reference-node.sh (profile `backend`: internal users, guest from loopback), a
#      fresh database, and the 65536 open-file soft limit that script sets (the default node
#      allows 1,024 and cannot hold 5,000 connections);
#   3. a throwaway CA and a P-256 server certificate for localhost/127.0.0.1 (openssl), used
#      by both HAProxy and the gateway; clients offer only X25519 to both (the same
#      handshake: OpenSSL 3.0 has no post-quantum hybrid);
#   4. HAProxy (the Debian package, 2.6 on Debian 12) in the foreground, TCP mode, nbthread
#      the number of CPUs (HAProxy's default); the gateway runs with its own default worker
#      threads (one per CPU, one on 2 CPUs or fewer, with signature checks on its blocking
#      pool): each proxy as it ships, on the same CPUs;
#   5. the STS emulator (`amqp-iam-gateway sts-emulator`, a process of its own so that the
#      gateway's RSS is the gateway's) and the gateway with a generated config
#      (`serve --config`, the production path: TLS, JWKS-verified ES384 token, per-method
#      authorisation, log level info); a token minted by `amqp-iam-gateway token` with the
#      emulator's keys, passed to the load generator in a file;
#   6. the workloads, each repetition running direct, haproxy, gateway back to back; idle
#      first, while the proxies are fresh (memory per connection = RSS while all are open
#      minus RSS before, divided by the connections opened; for direct, RabbitMQ's own);
#      around every other run, the CPU time of the proxy and the broker, the proxy's
#      context switches and the CPU no process used, from /proc;
#   7. benches/compare-report.py: the table on stdout, and target/bench/results-<time>.json
#      (settings, machine, every run's raw output) and .md (the table, the CPU per message
#      of each process and the machine).
# Every load generator run is bounded by `timeout`. Ports: 5695 (node; distribution 25695,
# management 15695),
# 5696 HAProxy, 5697 gateway, 5698 STS emulator, 5699 gateway admin.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$(pwd)"

REPS=3
DURATION=10
WARMUP=1
IDLE=10000
SWEEP="1,10,100,1000"
IDLE_HOLD=10
IDLE_RATE=500
CHURN_DURATION=""
THREADS="$(nproc)"
THREADS_GIVEN=0
WORKLOADS="idle,1KiB,1KiB-confirms,16B,64KiB,latency,churn,churn-distinct,100x100,sweep"
PROFILE=release
KEEP_NODE=0
SMOKE=0

NODE_PORT=5695
NODE_DIST_PORT=25695
# Not the reference node's 15691: the harness runs beside a reference node left running.
NODE_MGMT_PORT=15695
HAPROXY_PORT=5696
GATEWAY_PORT=5697
STS_PORT=5698
ADMIN_PORT=5699
TOKENS_PORT=5700
TOKENS_ADMIN_PORT=5701
RMQ_TLS_PORT=5702

log() { echo "compare: $*" >&2; }
die() { echo "compare: error: $*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//' >&2; exit 2; }

# shellcheck source=SCRIPTDIR/../scripts/lib.sh
source "$ROOT/scripts/lib.sh"

positive() { [[ "$2" =~ ^[0-9]+([.][0-9]+)?$ ]] || die "$1 needs a number, got '$2'"; }

while (($#)); do
    case "$1" in
    --reps) positive "$1" "${2:-}"; REPS="$2"; shift ;;
    --duration) positive "$1" "${2:-}"; DURATION="$2"; shift ;;
    --warmup) positive "$1" "${2:-}"; WARMUP="$2"; shift ;;
    --idle) positive "$1" "${2:-}"; IDLE="$2"; shift ;;
    --threads) positive "$1" "${2:-}"; THREADS="$2"; THREADS_GIVEN=1; shift ;;
    --workloads) WORKLOADS="${2:-}"; shift ;;
    --sweep) [[ "${2:-}" =~ ^[0-9]+(,[0-9]+)*$ ]] || die "--sweep needs numbers, got '${2:-}'"
        SWEEP="$2"; shift ;;
    --debug) PROFILE=debug ;;
    --keep-node) KEEP_NODE=1 ;;
    --smoke) SMOKE=1 ;;
    -h | --help) usage ;;
    *) echo "compare: unknown option $1" >&2; usage ;;
    esac
    shift
done
if ((SMOKE)); then
    REPS=1 DURATION=0.5 WARMUP=0.25 CHURN_DURATION=1 IDLE=200 IDLE_HOLD=1 PROFILE=debug
    SWEEP="1,10"
fi
# The gateway's own default (one worker on 2 CPUs or fewer) unless --threads names a number.
((THREADS_GIVEN)) && GATEWAY_THREADS="${GATEWAY_THREADS:-$THREADS}"
GATEWAY_THREADS="${GATEWAY_THREADS:-default}"
if [[ $GATEWAY_THREADS == default ]]; then
    GATEWAY_ENV=(env -u TOKIO_WORKER_THREADS)  # env execs the gateway: $! stays its pid
else
    positive GATEWAY_THREADS "$GATEWAY_THREADS"
    GATEWAY_ENV=(env "TOKIO_WORKER_THREADS=$GATEWAY_THREADS")
fi
IFS=, read -ra SWEEP_POINTS <<<"$SWEEP"
SWEEP_MAX=0
for n in "${SWEEP_POINTS[@]}"; do ((n > SWEEP_MAX)) && SWEEP_MAX=$n; done
CHURN_DURATION="${CHURN_DURATION:-$DURATION}"
IFS=, read -ra WORKLOAD_LIST <<<"$WORKLOADS"
for w in "${WORKLOAD_LIST[@]}"; do
    case "$w" in idle | 1KiB | 1KiB-confirms | 16B | 64KiB | latency | churn | churn-distinct | 100x100 | sweep) ;;
    *) die "unknown workload '$w'" ;; esac
done

BENCH="$ROOT/target/bench"
STAMP="$(date -u +%Y-%m-%dT%H%M%SZ)"
RUN_DIR="$BENCH/run-$STAMP"
RUNS="$RUN_DIR/runs.jsonl"
mkdir -p "$RUN_DIR"
T0=$SECONDS

# --- 1. packages and build ---------------------------------------------------------------

install_missing() {
    local missing=()
    command -v haproxy >/dev/null 2>&1 || missing+=(haproxy)
    command -v openssl >/dev/null 2>&1 || missing+=(openssl)
    command -v python3 >/dev/null 2>&1 || missing+=(python3)
    [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || missing+=(rabbitmq-server)
    apt_install "${missing[@]}"
}
install_missing

command -v cargo >/dev/null 2>&1 || die "cargo not found"
TARGET_DIR="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
build=(cargo build -q --bin amqp-iam-gateway)
# scripts/test.sh sets the features of its build, so that the smoke reuses it.
[[ -n ${GATEWAY_FEATURES:-} ]] && build+=(--features "$GATEWAY_FEATURES")
[[ -n ${LOADGEN:-} ]] || build+=(--example loadgen)
[[ $PROFILE == release ]] && build+=(--release)
log "building (${build[*]})"
"${build[@]}"
GW="$TARGET_DIR/$PROFILE/amqp-iam-gateway"
LOADGEN="${LOADGEN:-$TARGET_DIR/$PROFILE/examples/loadgen}"
[[ -x $GW && -x $LOADGEN ]] || die "build produced no $GW or $LOADGEN"

# The gateway holds two descriptors per client, the load generator one per connection;
# HAProxy sets its own limit from maxconn.
ulimit -Sn "$(ulimit -Hn)"
# A proxy holds two sockets per connection: more idle connections than the hard limit
# allows cannot be held by either proxy (a container may not let even root raise it).
hard="$(ulimit -Hn)"
if [[ $hard != unlimited ]] && ((IDLE * 2 + 600 > hard)); then
    log "open-file hard limit $hard: idle connections lowered from $IDLE to $(((hard - 600) / 2))"
    IDLE=$(((hard - 600) / 2))
fi
# --- processes and cleanup ---------------------------------------------------------------

node() {
    REFERENCE_NODE_TLS="$RMQ_TLS_PORT:$BENCH/tls" \
    REFERENCE_NODE_PROFILE=backend REFERENCE_NODE_NAME=rabbit_bench@localhost \
        REFERENCE_NODE_PORT=$NODE_PORT REFERENCE_NODE_DIST_PORT=$NODE_DIST_PORT \
        REFERENCE_NODE_MGMT_PORT=$NODE_MGMT_PORT \
        REFERENCE_NODE_STATE="$ROOT/target/bench-node" bash "$ROOT/scripts/reference-node.sh" "$@"
}

PIDS=()
NODE_STARTED=0
cleanup() {
    local rc=$? pid
    trap - EXIT INT TERM
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    if ((NODE_STARTED && !KEEP_NODE)); then
        node stop >/dev/null 2>&1 || log "could not stop the benchmark node"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() { # PORT PID NAME LOG
    local deadline=$((SECONDS + 30))
    until port_open "$1"; do
        kill -0 "$2" 2>/dev/null || die "$3 exited at start; see $4"
        ((SECONDS < deadline)) || die "$3 did not listen on $1 within 30 s; see $4"
        sleep 0.1
    done
}

for p in $HAPROXY_PORT $GATEWAY_PORT $STS_PORT $ADMIN_PORT $TOKENS_PORT $TOKENS_ADMIN_PORT $RMQ_TLS_PORT; do
    port_open "$p" && die "port $p is in use (a previous run still going?)"
done

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
# CPU time (user + system) a process has used, all its threads, in seconds: fields 14 and
# 15 of /proc/PID/stat, after the command name (which could hold spaces).
CLK_TCK="$(getconf CLK_TCK)"
cpu_s() { sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | awk -v hz="$CLK_TCK" '{printf "%.2f", ($12 + $13) / hz}'; }
# CPU time no process used, all CPUs (idle and iowait, fields 5 and 6 of /proc/stat's first
# line), in seconds.
idle_s() { awk -v hz="$CLK_TCK" 'NR == 1 {printf "%.2f", ($5 + $6) / hz}' /proc/stat; }
# Context switches (voluntary and not) of a process's live threads, summed.
ctx_switches() { cat /proc/"$1"/task/*/status 2>/dev/null | awk '/ctxt_switches:/ {n += $2} END {print n + 0}'; }

# --- 2. certificates (HAProxy, the gateways and the node's TLS listener) ---------------------------------------------------------------------

TLS="$BENCH/tls"
mkdir -p "$TLS"
log "certificates in $TLS"
(
    cd "$TLS"
    ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
    openssl req -x509 -new "${ec[@]}" -keyout ca-key.pem -out ca.pem -days 30 \
        -subj "/CN=amqp-iam-gateway benchmark CA" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null
    openssl req -new "${ec[@]}" -keyout server-key.pem -out server.csr -subj "/CN=localhost" 2>/dev/null
    printf '%s\n' "subjectAltName=DNS:localhost,IP:127.0.0.1" "basicConstraints=CA:FALSE" \
        "keyUsage=critical,digitalSignature" "extendedKeyUsage=serverAuth" >server.ext
    openssl x509 -req -in server.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
        -out server.pem -days 30 -extfile server.ext 2>/dev/null
    cat server.pem server-key.pem >haproxy.pem
    chmod 600 ./*-key.pem haproxy.pem
)
CA="$TLS/ca.pem"

# --- 3. the RabbitMQ node ----------------------------------------------------------------

log "starting the benchmark node (rabbit_bench@localhost, 127.0.0.1:$NODE_PORT)"
NODE_STARTED=1
node start
BEAM_PID="$(cat "$ROOT/target/bench-node/node.pid")"
nofile="$(awk '/^Max open files/ {print $4}' "/proc/$BEAM_PID/limits")"
log "beam.smp pid $BEAM_PID, open-file soft limit $nofile"
[[ $nofile == unlimited ]] || ((nofile > IDLE + 1000)) ||
    die "the node may open $nofile files: too few for $IDLE idle connections"

# --- 4. HAProxy --------------------------------------------------------------------------

# HAProxy needs two descriptors per maxconn: kept within the hard limit (see above).
MAXCONN=$((IDLE > 2 * SWEEP_MAX ? IDLE + 200 : 2 * SWEEP_MAX + 200))
cat >"$BENCH/haproxy.cfg" <<EOF
# Generated by benches/compare.sh. TLS termination in TCP mode in front of the benchmark node.
global
    nbthread $THREADS
    maxconn $MAXCONN
defaults
    mode tcp
    maxconn $MAXCONN
    timeout connect 5s
    # Idle AMQP connections (heartbeat 60 s) must not be cut during the idle workload.
    timeout client 30m
    timeout server 30m
frontend amqps
    bind 127.0.0.1:$HAPROXY_PORT ssl crt $TLS/haproxy.pem
    default_backend rabbit
backend rabbit
    server bench 127.0.0.1:$NODE_PORT
EOF
haproxy -c -q -f "$BENCH/haproxy.cfg"
haproxy -f "$BENCH/haproxy.cfg" -db >"$BENCH/haproxy.log" 2>&1 &
HAPROXY_PID=$!
PIDS+=("$HAPROXY_PID")
wait_port $HAPROXY_PORT $HAPROXY_PID haproxy "$BENCH/haproxy.log"
log "haproxy pid $HAPROXY_PID on 127.0.0.1:$HAPROXY_PORT (nbthread $THREADS)"

# --- 5. STS emulator, token, gateway -----------------------------------------------------

ADMIN_ROLE="arn:aws:iam::111122223333:role/RabbitMqAdminRole"
STS_URL="http://127.0.0.1:$STS_PORT"
mkdir -p "$BENCH/sts"
cat >"$BENCH/sts/principals.toml" <<EOF
# Generated by benches/compare.sh (AWS's documented example credentials).
[[principal]]
access_key_id = "AKIAIOSFODNN7EXAMPLE"
secret_access_key = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
role_arn = "$ADMIN_ROLE"
account = "111122223333"
EOF
"$GW" sts-emulator --listen "127.0.0.1:$STS_PORT" --state-dir "$BENCH/sts" \
    --principals "$BENCH/sts/principals.toml" >"$BENCH/sts.out" 2>"$BENCH/sts.log" &
PIDS+=($!)
wait_port $STS_PORT $! sts-emulator "$BENCH/sts.log"

cat >"$BENCH/gateway.toml" <<EOF
# Generated by benches/compare.sh: the production code path (serve --config), keys from the
# STS emulator's JWKS, one role alias granting everything on every vhost.
[listener]
address = "127.0.0.1:$GATEWAY_PORT"
tls_cert = "$TLS/server.pem"
tls_key = "$TLS/server-key.pem"
max_connections = $MAXCONN

[backend]
nodes = ["127.0.0.1:$NODE_PORT"]
username = "guest"
password = "guest"

[oauth2]
resource_server_id = "rabbitmq"
scope_prefix = "rabbitmq/"
issuer = "$STS_URL"
additional_scopes_key = "sub"

[oauth2.scope_aliases]
"$ADMIN_ROLE" = "rabbitmq/read:*/* rabbitmq/write:*/* rabbitmq/configure:*/*"

[admin]
address = "127.0.0.1:$ADMIN_PORT"

[log]
level = "info"

[runtime]
per_core = ${GATEWAY_PER_CORE:-false}
busy_poll_us = ${GATEWAY_BUSY_POLL_US:-0}
EOF
"$GW" check-config --config "$BENCH/gateway.toml" >/dev/null
"${GATEWAY_ENV[@]}" RUST_LOG=info \
    "$GW" serve --config "$BENCH/gateway.toml" >"$BENCH/gateway.log" 2>&1 &
GATEWAY_PID=$!
PIDS+=("$GATEWAY_PID")
wait_port $GATEWAY_PORT $GATEWAY_PID gateway "$BENCH/gateway.log"
log "gateway pid $GATEWAY_PID on 127.0.0.1:$GATEWAY_PORT ($GATEWAY_THREADS tokio worker threads)"

# (d) The same gateway with backend tokens. The node (profile `backend`) runs the OAuth 2.0
# plugin with tests/fixtures/rsa-public.pem as signing key test-rsa; tokens are added to its
# auth_backends after the internal users (guest keeps its password), and this gateway signs
# with the matching private key.
[[ $(node ctl -q eval 'application:set_env(rabbit, auth_backends,
        [rabbit_auth_backend_internal, rabbit_auth_backend_oauth2]).') == ok ]] ||
    die "could not add the oauth2 backend to the benchmark node"
(umask 077 && cp "$ROOT/tests/fixtures/rsa-private.pem" "$BENCH/backend-token.pem")
sed -e "s/^address = \"127.0.0.1:$GATEWAY_PORT\"/address = \"127.0.0.1:$TOKENS_PORT\"/" \
    -e "s/^address = \"127.0.0.1:$ADMIN_PORT\"/address = \"127.0.0.1:$TOKENS_ADMIN_PORT\"/" \
    -e "s|^password = \"guest\"|password = \"guest\"\nauth = \"token\"\n\n[backend.token]\nsigning_key = \"$BENCH/backend-token.pem\"\nkid = \"test-rsa\"|" \
    "$BENCH/gateway.toml" >"$BENCH/gateway-tokens.toml"
"$GW" check-config --config "$BENCH/gateway-tokens.toml" >/dev/null ||
    die "the benchmark node does not accept the gateway's backend tokens"
"${GATEWAY_ENV[@]}" RUST_LOG=info \
    "$GW" serve --config "$BENCH/gateway-tokens.toml" >"$BENCH/gateway-tokens.log" 2>&1 &
TOKENS_PID=$!
PIDS+=("$TOKENS_PID")
wait_port $TOKENS_PORT $TOKENS_PID gateway-tokens "$BENCH/gateway-tokens.log"
log "gateway with backend tokens pid $TOKENS_PID on 127.0.0.1:$TOKENS_PORT"

TOKEN="$BENCH/token"
# A fresh token for each gateway run: the longest a run can take stays far inside its hour.
mint() {
    (umask 077 && "$GW" token --state-dir "$BENCH/sts" --issuer-url "$STS_URL" \
        --role-arn "$ADMIN_ROLE" --duration 3600 >"$TOKEN")
}
mint

# (e) RabbitMQ's own TLS listener: its OAuth 2.0 plugin verifies the emulator's tokens as
# the gateway does (the plugin of 3.10.8 reads these settings at every login): the
# emulator's ES384 public key by its kid beside test-rsa, the role ARN of `sub` as an alias
# of every permission (`extra_scopes_source`, which rabbitmq.conf calls additional_scopes_key;
# 3.10.8 has no scope_prefix: its prefix is `rabbitmq.`).
PYTHON="$ROOT/.venv/bin/python"  # scripts/setup.sh's, with cryptography
[[ -x $PYTHON ]] || PYTHON=python3
EMU_KEY="$("$PYTHON" - "$STS_URL" "$TOKEN" <<'PY'
import base64, json, sys, urllib.request
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
# The key the minted token names.
head = open(sys.argv[2]).read().split(".")[0]
kid = json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["kid"]
keys = json.load(urllib.request.urlopen(sys.argv[1] + "/.well-known/jwks.json"))["keys"]
k = next(k for k in keys if k["kid"] == kid)
b = lambda s: int.from_bytes(base64.urlsafe_b64decode(s + "=" * (-len(s) % 4)), "big")
if k["kty"] == "EC":
    pub = ec.EllipticCurvePublicNumbers(b(k["x"]), b(k["y"]), ec.SECP384R1()).public_key()
else:
    pub = rsa.RSAPublicNumbers(b(k["e"]), b(k["n"])).public_key()
print(k["kid"])
print(pub.public_bytes(serialization.Encoding.PEM,
                       serialization.PublicFormat.SubjectPublicKeyInfo).decode().strip())
PY
)"
EMU_KID="$(head -1 <<<"$EMU_KEY")"
EMU_PUB="$(tail -n +2 <<<"$EMU_KEY")"
RSA_PUB="$(cat "$ROOT/tests/fixtures/rsa-public.pem")"
[[ $(node ctl -q eval "
    application:set_env(rabbitmq_auth_backend_oauth2, key_config, [
        {default_key, <<\"test-rsa\">>},
        {signing_keys, #{<<\"test-rsa\">> => {pem, <<\"$RSA_PUB
\">>}, <<\"$EMU_KID\">> => {pem, <<\"$EMU_PUB
\">>}}},
        {algorithms, [<<\"RS256\">>, <<\"ES384\">>, <<\"RS384\">>, <<\"RS512\">>]}]),
    application:set_env(rabbitmq_auth_backend_oauth2, extra_scopes_source, <<\"sub\">>),
    application:set_env(rabbitmq_auth_backend_oauth2, scope_aliases, #{
        <<\"$ADMIN_ROLE\">> => [<<\"rabbitmq.read:*/*\">>, <<\"rabbitmq.write:*/*\">>,
                                 <<\"rabbitmq.configure:*/*\">>]}).") == ok ]] ||
    die "could not give the benchmark node the emulator's key"
log "RabbitMQ's own TLS listener on 127.0.0.1:$RMQ_TLS_PORT verifies the emulator's tokens (kid $EMU_KID)"

# churn-distinct: a file of fresh tokens, one per connection (more than a run can use:
# 3,000 per second of churn, at least 2,000), minted before each gateway run.
TOKENS_DISTINCT="$BENCH/tokens-distinct"
mint_distinct() {
    local n
    n="$(awk "BEGIN {n = int($CHURN_DURATION * 3000); print (n < 2000 ? 2000 : n)}")"
    (umask 077 && "$GW" token --state-dir "$BENCH/sts" --issuer-url "$STS_URL" \
        --role-arn "$ADMIN_ROLE" --duration 3600 --count "$n" >"$TOKENS_DISTINCT")
}

# --- 6. workloads ------------------------------------------------------------------------

# The same TLS key exchange for both proxies: HAProxy (OpenSSL 3.0) has no post-quantum
# hybrid, which rustls offers first and the gateway would otherwise pick.
KX="--tls-kx X25519"
target_args() {
    case "$1" in
    direct) echo "--url amqp://guest:guest@127.0.0.1:$NODE_PORT/%2F" ;;
    haproxy) echo "--url amqps://guest:guest@localhost:$HAPROXY_PORT/%2F --cacert $CA $KX" ;;
    gateway) echo "--url amqps://@localhost:$GATEWAY_PORT/%2F --cacert $CA $KX --password-file $(token_file "$2")" ;;
    gateway-tokens) echo "--url amqps://@localhost:$TOKENS_PORT/%2F --cacert $CA $KX --password-file $(token_file "$2")" ;;
    rabbitmq-tls) echo "--url amqps://@localhost:$RMQ_TLS_PORT/%2F --cacert $CA $KX --password-file $(token_file "$2")" ;;
    esac
}

token_file() { # WORKLOAD
    if [[ $1 == churn-distinct ]]; then echo "$TOKENS_DISTINCT"; else echo "$TOKEN"; fi
}

target_pid() {
    case "$1" in
    direct) echo "$BEAM_PID" ;; haproxy) echo "$HAPROXY_PID" ;; gateway) echo "$GATEWAY_PID" ;;
    gateway-tokens) echo "$TOKENS_PID" ;;
    rabbitmq-tls) echo "$BEAM_PID" ;;
    esac
}

workload_args() {
    local t=(--duration "$DURATION" --warmup "$WARMUP")
    case "$1" in
    1KiB) echo throughput --size 1024 "${t[@]}" ;;
    1KiB-confirms) echo throughput --size 1024 --confirm-window 100 "${t[@]}" ;;
    16B) echo throughput --size 16 "${t[@]}" ;;
    64KiB) echo throughput --size 65536 "${t[@]}" ;;
    latency) echo throughput --size 1024 --rate 2000 "${t[@]}" ;;
    churn | churn-distinct) echo churn --duration "$CHURN_DURATION" ;;
    idle) echo idle --connections "$IDLE" --hold "$IDLE_HOLD" --rate "$IDLE_RATE" ;;
    100x100) echo throughput --size 1024 --producers 100 --consumers 100 --queues 100 \
        --confirm-window 64 "${t[@]}" ;;
    sweep-*) local n=${1#sweep-}
        echo throughput --size 1024 --producers "$n" --consumers "$n" --queues "$n" \
            --confirm-window 64 "${t[@]}" ;;
    esac
}

FAILED=0

# Appends one line to runs.jsonl: the run's identity, exit status, memory readings, the CPU
# the broker and the proxy used during it (null for the idle workload) and the load
# generator's JSON (null when it printed none).
record() { # WORKLOAD TARGET REP EXIT SECONDS RSS_BEFORE RSS_DURING OUT [COST_JSON]
    local result=null
    if [[ -s $8 && $(head -c1 "$8") == "{" ]]; then result="$(tr -d '\n' <"$8")"; fi
    printf '{"workload":"%s","target":"%s","rep":%s,"exit":%s,"seconds":%s,"rss_before_kib":%s,"rss_during_kib":%s,"cost":%s,"result":%s}\n' \
        "$1" "$2" "$3" "$4" "$5" "${6:-null}" "${7:-null}" "${9:-null}" "$result" >>"$RUNS"
}

# The proxy's process for a target, or nothing when the clients talk to the broker itself.
proxy_pid() {
    case "$1" in direct | rabbitmq-tls) ;; *) target_pid "$1" ;; esac
}

# What a run cost the broker and the proxy: CPU seconds and the proxy's context switches,
# read around the load generator's run (its own CPU is in its JSON), and the CPU time that
# no process used meanwhile: what the path left idle.
COST_PROXY=""
cost_start() { # TARGET
    COST_PROXY="$(proxy_pid "$1")"
    COST_B0="$(cpu_s "$BEAM_PID")"
    COST_I0="$(idle_s)"
    COST_P0="" COST_X0=""
    if [[ -n $COST_PROXY ]]; then
        COST_P0="$(cpu_s "$COST_PROXY")"
        COST_X0="$(ctx_switches "$COST_PROXY")"
    fi
}
cost_json() {
    local b1 p=null x=null
    b1="$(cpu_s "$BEAM_PID")"
    if [[ -n $COST_PROXY ]]; then
        p="$(awk -v a="$COST_P0" -v b="$(cpu_s "$COST_PROXY")" 'BEGIN {printf "%.2f", b - a}')"
        x=$(($(ctx_switches "$COST_PROXY") - COST_X0))
    fi
    printf '{"broker_cpu_s":%s,"proxy_cpu_s":%s,"proxy_ctx_switches":%s,"idle_cpu_s":%s}' \
        "$(awk -v a="$COST_B0" -v b="$b1" 'BEGIN {printf "%.2f", b - a}')" "$p" "$x" \
        "$(awk -v a="$COST_I0" -v b="$(idle_s)" 'BEGIN {printf "%.2f", b - a}')"
}

run_one() { # WORKLOAD TARGET REP
    local w=$1 target=$2 rep=$3 out="$RUN_DIR/$1.$2.$3" rc=0 t0=$SECONDS
    local -a args
    read -ra args <<<"$(workload_args "$w") $(target_args "$target" "$w") --json"
    if [[ $target == gateway* || $target == rabbitmq-tls ]]; then
        if [[ $w == churn-distinct ]]; then mint_distinct; else mint; fi
    fi
    if [[ $w == idle ]]; then
        run_idle "$target" "$out" "${args[@]}" || rc=$?
        return 0
    fi
    # Bounded: the run's own duration plus a minute for connecting and draining (and, for
    # many connections, time to open them: 2,000 TLS handshakes take seconds).
    cost_start "$target"
    timeout -k 5 "$(awk "BEGIN {print int($DURATION + $WARMUP + 60 + 2 * $SWEEP_MAX / 100)}")" \
        "$LOADGEN" "${args[@]}" >"$out.json" 2>"$out.err" || rc=$?
    ((rc == 0)) || { FAILED=1; log "$w $target rep $rep FAILED (exit $rc, see $out.err)"; }
    record "$w" "$target" "$rep" "$rc" $((SECONDS - t0)) "" "" "$out.json" "$(cost_json)"
    log "$w $target rep $rep: $(tr -d '\n' <"$out.json" | cut -c1-160)"
}

# The idle workload: RSS of the process behind the target before the connections, and once
# the load generator says `ready` (all open) plus a second to settle.
run_idle() { # TARGET OUT ARGS...
    local target=$1 out=$2 pid before during="" rc=0 t0=$SECONDS
    shift 2
    pid="$(target_pid "$target")"
    before="$(rss_kib "$pid")"
    timeout -k 5 $((IDLE / IDLE_RATE + IDLE_HOLD + 90)) \
        "$LOADGEN" "$@" >"$out.json" 2>"$out.err" &
    local lg=$!
    local deadline=$((SECONDS + IDLE / IDLE_RATE + 60))
    until grep -q '^ready' "$out.err" 2>/dev/null; do
        kill -0 "$lg" 2>/dev/null || break
        ((SECONDS < deadline)) || break
        sleep 0.2
    done
    if grep -q '^ready' "$out.err" 2>/dev/null; then
        sleep 1
        during="$(rss_kib "$pid")"
    fi
    wait "$lg" || rc=$?
    [[ -n $during ]] || { ((rc != 0)) || rc=1; log "idle $target: never ready"; }
    ((rc == 0)) || { FAILED=1; log "idle $target FAILED (exit $rc, see $out.err)"; }
    record idle "$target" 1 "$rc" $((SECONDS - t0)) "$before" "$during" "$out.json"
    log "idle $target: RSS $before -> ${during:-?} KiB; $(tr -d '\n' <"$out.json" | cut -c1-160)"
}

TARGETS=(direct haproxy gateway gateway-tokens rabbitmq-tls)
for w in "${WORKLOAD_LIST[@]}"; do
    reps=$REPS
    [[ $w == idle ]] && reps=1
    for rep in $(seq 1 "$reps"); do
        for target in "${TARGETS[@]}"; do
            if [[ $w == sweep ]]; then
                for n in "${SWEEP_POINTS[@]}"; do run_one "sweep-$n" "$target" "$rep"; done
            else
                run_one "$w" "$target" "$rep"
            fi
        done
    done
done

# --- 7. report ---------------------------------------------------------------------------

if grep -qiE '\b(DEBUG|TRACE)\b' "$BENCH/gateway.log" "$BENCH/gateway-tokens.log"; then
    log "warning: the gateway log has debug lines"
fi
nrun="$(wc -l <"$RUNS")"
log "$nrun runs in $((SECONDS - T0)) s"

BENCH_HAPROXY_VERSION="$(haproxy -v | awk 'NR == 1')"
BENCH_RABBITMQ_VERSION="$(node ctl -q eval 'rabbit:product_version().' 2>/dev/null | tr -d '"' || true)"
BENCH_ERLANG_VERSION="$(node ctl -q eval 'erlang:system_info(otp_release).' 2>/dev/null | tr -d '"' || true)"
BENCH_RUSTC_VERSION="$(rustc -V)"
BENCH_COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
git diff --quiet HEAD 2>/dev/null || BENCH_COMMIT+="-dirty"
export BENCH_SMOKE=$SMOKE BENCH_REPS=$REPS BENCH_DURATION=$DURATION BENCH_WARMUP=$WARMUP \
    BENCH_IDLE=$IDLE BENCH_SWEEP=$SWEEP BENCH_THREADS=$THREADS BENCH_GATEWAY_THREADS=$GATEWAY_THREADS BENCH_PROFILE=$PROFILE BENCH_WORKLOADS=$WORKLOADS \
    BENCH_HAPROXY_VERSION BENCH_RABBITMQ_VERSION BENCH_ERLANG_VERSION BENCH_RUSTC_VERSION \
    BENCH_COMMIT BENCH_ELAPSED=$((SECONDS - T0)) BENCH_STAMP=$STAMP
report_rc=0
python3 "$ROOT/benches/compare-report.py" "$RUNS" "$BENCH/results-$STAMP" || report_rc=$?
((FAILED == 0 && report_rc == 0)) || die "some runs failed or gave no number (see above and $RUN_DIR)"
