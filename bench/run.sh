#!/usr/bin/env bash
# The gateway load harness: in one run on one machine, a small JSON HTTP tool call and an MCP
# `tools/call`, each measured direct to a fast upstream, through nginx as a plain reverse proxy,
# through a plain reverse proxy on hyper (`loadgen proxy`: the libraries remit forwards with,
# checking and recording nothing, so what forwarding alone costs a Rust gateway here),
# and through remit (bearer mode; a fresh ES256 proof per call; a fresh EdDSA proof per call),
# at 64 keep-alive connections, then one table with the ratios to nginx and remit's RSS, and
# for each remit run a line from remit's /metrics: the decision's and the upstream head's mean
# latency, how busy the store's writer was (gathering, committing) and its lookup filler.
#
#   bash bench/run.sh                 # ~2 minutes of load after the build
#   DURATION=20s WARMUP=3s CONNECTIONS=64 LOADGEN_THREADS=2 bash bench/run.sh
#   KEEP=1 bash bench/run.sh          # keep the work directory (configs, logs, results)
#   DECISION=1 bash bench/run.sh      # also run the in-process decision benchmark
#   SKIP_BUILD=1 bash bench/run.sh    # use target/release/{remit,loadgen} as they are
#   RESULTS_COPY=out.jsonl bash bench/run.sh   # also keep the raw results (one JSON line a run)
#   ONLY='http (nginx|remit bearer)' bash bench/run.sh   # only runs whose "group label" matches
#   STORE_SYNC=normal bash bench/run.sh    # remit's `store_sync` (default: full)
#   PERF_DIR=/tmp/prof bash bench/run.sh   # also `perf record` remit during each remit run
#   PERF_OPTS="-F 199 --call-graph dwarf,32768" PERF_DIR=/tmp/prof bash bench/run.sh
#   CALLGRIND_DIR=/tmp/cg CONNECTIONS=4 DURATION=15s WARMUP=5s ONLY='remit bearer' bash bench/run.sh
#                                     # remit under valgrind's callgrind: instructions per call,
#                                     # repeatable where wall-clock figures are not (see BENCHMARKS.md)
#
# Everything listens on 127.0.0.1 and is stopped on exit. The only network access is
# `apt-get install nginx` when nginx is missing.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-64}
LOADGEN_THREADS=${LOADGEN_THREADS:-2}
UPSTREAM_THREADS=${UPSTREAM_THREADS:-1}
NGINX_WORKERS=${NGINX_WORKERS:-auto}
# The hyper proxy's worker threads: as many as remit's runtime has (one per core).
PROXY_THREADS=${PROXY_THREADS:-$(nproc)}
# One task per connection (budget 10,000 calls each), fresh tasks for every remit scenario.
TASKS=${TASKS:-$CONNECTIONS}
BASE_PORT=${BASE_PORT:-$((20000 + RANDOM % 20000))}
UP_PORT=$BASE_PORT
NGINX_PORT=$((BASE_PORT + 1))
REMIT_PORT=$((BASE_PORT + 2))
PROXY_PORT=$((BASE_PORT + 3))
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
LOADGEN=$TARGET/release/loadgen
REMIT=$TARGET/release/remit
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)

WORK=$(mktemp -d "${TMPDIR:-/tmp}/remit-bench.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        # Bounded: a process that ignores TERM for 5 s gets KILL.
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$pid" 2>/dev/null || true
    done
    if [[ ${KEEP:-0} == 1 ]]; then
        echo "work directory kept: $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n== %s\n' "$*" >&2; }

# Waits (at most 10 s) until something accepts connections on 127.0.0.1:$1.
wait_port() {
    local port=$1 name=$2
    for _ in $(seq 100); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "error: $name did not start on port $port; see $WORK/*.log" >&2
    tail -n 20 "$WORK"/*.log >&2 || true
    exit 1
}

# --- What the harness needs -------------------------------------------------------------------
if ! command -v nginx >/dev/null; then
    say "installing nginx"
    if [[ $(id -u) == 0 ]]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get install -y nginx >/dev/null || {
        $SUDO apt-get update >/dev/null && $SUDO apt-get install -y nginx >/dev/null
    }
fi
NGINX=$(command -v nginx)

if [[ ${SKIP_BUILD:-0} == 1 ]]; then
    say "using the binaries already built in $TARGET/release (SKIP_BUILD=1)"
else
    say "building (release)"
    (cd "$ROOT" && cargo build --release -p remit -p loadgen)
fi
for binary in "$LOADGEN" "$REMIT"; do
    [[ -x $binary ]] || { echo "error: $binary is missing; build it first" >&2; exit 1; }
done

say "machine"
echo "$(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')" >&2
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
if awk '{exit !($1 >= 1.0)}' /proc/loadavg; then
    echo "warning: the machine is busy (1-minute load >= 1); other processes will skew the figures" >&2
fi
echo "$("$NGINX" -v 2>&1)" >&2
echo "work directory: $WORK (filesystem $(df -T "$WORK" | awk 'NR==2 {print $2}'))" >&2

# --- The fast upstream ------------------------------------------------------------------------
"$LOADGEN" upstream --listen "127.0.0.1:$UP_PORT" --threads "$UPSTREAM_THREADS" \
    >"$WORK/upstream.log" 2>&1 &
UP_PID=$!
PIDS+=("$UP_PID")
wait_port "$UP_PORT" upstream

# --- nginx: a plain reverse proxy with a keep-alive pool to the upstream ----------------------
mkdir -p "$WORK/nginx"
cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes $NGINX_WORKERS;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $WORK/nginx/body;
    proxy_temp_path $WORK/nginx/proxy;
    fastcgi_temp_path $WORK/nginx/fastcgi;
    uwsgi_temp_path $WORK/nginx/uwsgi;
    scgi_temp_path $WORK/nginx/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 120s;
    upstream fast {
        server 127.0.0.1:$UP_PORT;
        keepalive 128;
        keepalive_requests 10000000;
    }
    server {
        listen 127.0.0.1:$NGINX_PORT;
        location / {
            proxy_pass http://fast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
"$NGINX" -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" -g 'daemon off;' \
    >"$WORK/nginx.log" 2>&1 &
NGINX_PID=$!
PIDS+=("$NGINX_PID")
wait_port "$NGINX_PORT" nginx
NGINX_WORKER_PIDS=$(pgrep -P "$NGINX_PID" | tr '\n' ' ')

# --- A plain reverse proxy on hyper, in front of the same upstream ----------------------------
"$LOADGEN" proxy --listen "127.0.0.1:$PROXY_PORT" --upstream "http://127.0.0.1:$UP_PORT" \
    --threads "$PROXY_THREADS" >"$WORK/proxy.log" 2>&1 &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
wait_port "$PROXY_PORT" "hyper proxy"

# --- remit: the gateway in front of the same upstream -----------------------------------------
# The upstream credential is injected as remit does in production (and scrubbed from answers).
export BENCH_UPSTREAM_TOKEN="bench-upstream-secret-0123456789"
cat >"$WORK/remit.toml" <<EOF
listen = "127.0.0.1:$REMIT_PORT"
public_url = "http://127.0.0.1:$REMIT_PORT"
store = "sqlite://$WORK/remit.db"
store_sync = "${STORE_SYNC:-full}"

[tasks]
max_ttl_seconds = 3600
max_budget = 10000

[gateway]   # high enough that rate limits never interfere
rate_per_agent = 1000000
burst_per_agent = 1000000
rate_per_task = 1000000
burst_per_task = 1000000

[[tools]]
name = "fast"
kind = "http"
upstream = "http://127.0.0.1:$UP_PORT"
auth = { bearer = "env:BENCH_UPSTREAM_TOKEN" }
bearer_tokens = true
routes = [
  { method = "GET", path = "/repos/{owner}/{repo}/issues", action = "list_issues", class = "read", resource = "{owner}/{repo}" },
]

[[tools]]
name = "fastmcp"
kind = "mcp"
upstream = "http://127.0.0.1:$UP_PORT/mcp"
auth = { bearer = "env:BENCH_UPSTREAM_TOKEN" }
bearer_tokens = true
mcp_tools = { lookup = { class = "read", resource = "id" } }
EOF

say "agent keys and registration"
"$LOADGEN" keygen --alg es256 --private "$WORK/es256.jwk" --public "$WORK/es256.pub.jwk" >/dev/null
"$LOADGEN" keygen --alg ed25519 --private "$WORK/ed25519.jwk" --public "$WORK/ed25519.pub.jwk" >/dev/null

REMIT_SERVE=("$REMIT" --config "$WORK/remit.toml" serve)
if [[ -n ${CALLGRIND_DIR:-} ]]; then
    mkdir -p "$CALLGRIND_DIR"
    rm -f "$CALLGRIND_DIR"/callgrind.out*
    REMIT_SERVE=(valgrind --tool=callgrind --compress-strings=no --callgrind-out-file="$CALLGRIND_DIR/callgrind.out"
        "${REMIT_SERVE[@]}")
fi
"${REMIT_SERVE[@]}" >"$WORK/remit.log" 2>&1 &
REMIT_PID=$!
PIDS+=("$REMIT_PID")
wait_port "$REMIT_PORT" remit
if [[ -n ${CALLGRIND_DIR:-} ]]; then # wait_port's 10 s may not be enough under valgrind
    until curl -fsS "http://127.0.0.1:$REMIT_PORT/metrics" >/dev/null 2>&1; do sleep 1; done
fi
# Registered once `serve` has created the store (admin commands never create one).
"$REMIT" --config "$WORK/remit.toml" agent create bench --owner bench@example.org \
    --key "$WORK/es256.pub.jwk" --key "$WORK/ed25519.pub.jwk" >&2

SCOPES='[{"tool":"fast","actions":["list_issues"],"resources":["acme/*"]},{"tool":"fastmcp","actions":["lookup"],"resources":["*"]}]'
grant() { # grant KEY_FILE OUT_FILE
    "$LOADGEN" grant --remit "http://127.0.0.1:$REMIT_PORT" --agent bench --key "$1" \
        --scopes "$SCOPES" --count "$TASKS" --budget 10000 --ttl 3600 --out "$2"
}

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
load() { # load GROUP LABEL URL PIDS [extra loadgen args…]
    local group=$1 label=$2 url=$3 pids=$4
    shift 4
    if [[ -n ${ONLY:-} && ! "$group $label" =~ $ONLY ]]; then
        return 0
    fi
    local pid_args=()
    for pid in $pids; do pid_args+=(--server-pid "$pid"); done
    local perf_pid="" calls_before=""
    if [[ -n ${CALLGRIND_DIR:-} && $label == remit* ]]; then
        # Warm up outside the counted window, then count only the measured calls.
        "$LOADGEN" run --group "$group" --label "$label (callgrind warm-up)" --url "$url" \
            --connections "$CONNECTIONS" --duration "$WARMUP" --warmup 0s \
            --threads "$LOADGEN_THREADS" "$@" >/dev/null 2>&1
        callgrind_control -z "$REMIT_PID" >/dev/null 2>&1
        calls_before=$(decisions)
    fi
    if [[ -n ${PERF_DIR:-} && $label == remit* ]]; then
        mkdir -p "$PERF_DIR"
        perf record -q ${PERF_OPTS:--F 499 -g} -p "$REMIT_PID" -o "$PERF_DIR/$group-${label// /-}.data" \
            >/dev/null 2>&1 &
        perf_pid=$!
    fi
    local counters_before="" started=""
    if [[ $label == remit* ]]; then
        counters_before=$(counters)
        started=$(date +%s.%N)
    fi
    "$LOADGEN" run --group "$group" --label "$label" --url "$url" \
        --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" \
        --threads "$LOADGEN_THREADS" --clock-ticks "$CLK_TCK" --out "$RESULTS" \
        "${pid_args[@]}" "$@" >&2
    if [[ -n $perf_pid ]]; then
        kill -INT "$perf_pid" 2>/dev/null || true
        wait "$perf_pid" 2>/dev/null || true
    fi
    if [[ -n $calls_before ]]; then
        local calls dump
        calls=$(($(decisions) - calls_before))
        callgrind_control -d "$REMIT_PID" >/dev/null 2>&1
        dump=$(ls -t "$CALLGRIND_DIR"/callgrind.out.* | head -n 1)
        mv "$dump" "$CALLGRIND_DIR/$group-${label// /-}.callgrind"
        awk -v calls="$calls" -v run="$group $label" '/^(summary|totals):/ {
                printf "callgrind: %s: %d calls, %d instructions per call\n", run, calls, $2 / calls
                exit }' "$CALLGRIND_DIR/$group-${label// /-}.callgrind" >&2
    fi
    if [[ -n $counters_before ]]; then
        # Over the whole run, warm-up included: where a call's time went, and how busy the
        # store's writer (the one serial stage) was.
        echo "$counters_before $(counters) $started $(date +%s.%N)" | awk -v run="$group $label" '{
            n = NF / 2 - 1; wall = $(2 * n + 2) - $(2 * n + 1)
            for (i = 1; i <= n; i++) d[i] = $(n + i) - $i
            if (d[1] == 0 || d[7] == 0) exit
            printf "- %s: decision %.2f ms and upstream head %.2f ms on average; store writer %.0f%% busy ", run, d[5] / d[6] * 1000, d[7] / d[8] * 1000, (d[3] + d[4]) / wall * 100
            printf "(gathering %.0f%%, committing %.0f%%), %.1f writes per batch, %.2f ms per commit; lookup filler %.0f%% busy", d[3] / wall * 100, d[4] / wall * 100, d[2] / d[1], d[4] / d[1] * 1000, d[10] / wall * 100
            if (d[9] > 0) printf ", %.1f ms per lookup fill", d[10] / d[9] * 1000
            printf "\n" }' >>"$WORK/writer.txt"
        curl -fsS "http://127.0.0.1:$REMIT_PORT/metrics" >"$WORK/metrics-$group-${label// /-}.txt" || true
    fi
    sleep 1
}

# remit's counters, in a fixed order: the store writer's batches, writes, gathering and
# committing seconds; the decision's and the upstream head's latency sums and counts; lookup
# fills and their seconds.
counters() {
    curl -fsS "http://127.0.0.1:$REMIT_PORT/metrics" | awk '
        /^remit_store_write_batches_total / {v[1] = $2}
        /^remit_store_write_operations_total / {v[2] = $2}
        /^remit_store_write_gathering_seconds_total / {v[3] = $2}
        /^remit_store_write_committing_seconds_total / {v[4] = $2}
        /^remit_decision_seconds_sum / {v[5] = $2}
        /^remit_decision_seconds_count / {v[6] = $2}
        /^remit_upstream_seconds_sum/ {v[7] += $2}
        /^remit_upstream_seconds_count/ {v[8] += $2}
        /^remit_store_lookup_fills_total / {v[9] = $2}
        /^remit_store_lookup_filling_seconds_total / {v[10] = $2}
        END {for (i = 1; i <= 10; i++) printf "%s ", v[i] + 0}'
}

# Decisions remit has made so far (every call the harness makes is one decision).
decisions() {
    curl -fsS "http://127.0.0.1:$REMIT_PORT/metrics" |
        awk '/^remit_decisions_total/ {sum += $NF} END {printf "%d", sum}'
}

HTTP_PATH=/repos/acme/api/issues
MCP_ARGS=(--mcp-tool lookup --mcp-arguments '{"id":"42"}')
REMIT_BASE="http://127.0.0.1:$REMIT_PORT"

for group in http mcp; do
    say "$group: $CONNECTIONS connections, ${WARMUP} warm-up + ${DURATION} each"
    if [[ $group == http ]]; then
        direct="http://127.0.0.1:$UP_PORT$HTTP_PATH"
        proxied="http://127.0.0.1:$NGINX_PORT$HTTP_PATH"
        plain="http://127.0.0.1:$PROXY_PORT$HTTP_PATH"
        through="$REMIT_BASE/http/fast$HTTP_PATH"
        extra=()
    else
        direct="http://127.0.0.1:$UP_PORT/mcp"
        proxied="http://127.0.0.1:$NGINX_PORT/mcp"
        plain="http://127.0.0.1:$PROXY_PORT/mcp"
        through="$REMIT_BASE/mcp/fastmcp"
        extra=("${MCP_ARGS[@]}")
    fi
    load "$group" direct "$direct" "$UP_PID" "${extra[@]}"
    load "$group" nginx "$proxied" "$NGINX_WORKER_PIDS" "${extra[@]}"
    load "$group" "hyper proxy" "$plain" "$PROXY_PID" "${extra[@]}"
    grant "$WORK/es256.jwk" "$WORK/tokens-bearer.txt"
    load "$group" "remit bearer" "$through" "$REMIT_PID" --mode bearer \
        --tokens "$WORK/tokens-bearer.txt" "${extra[@]}"
    grant "$WORK/es256.jwk" "$WORK/tokens-es256.txt"
    load "$group" "remit DPoP ES256" "$through" "$REMIT_PID" --mode dpop \
        --key "$WORK/es256.jwk" --tokens "$WORK/tokens-es256.txt" "${extra[@]}"
    grant "$WORK/ed25519.jwk" "$WORK/tokens-ed25519.txt"
    load "$group" "remit DPoP EdDSA" "$through" "$REMIT_PID" --mode dpop \
        --key "$WORK/ed25519.jwk" --tokens "$WORK/tokens-ed25519.txt" "${extra[@]}"
done

RSS_KIB=$(awk '/^VmRSS:/ {print $2}' "/proc/$REMIT_PID/status")
HWM_KIB=$(awk '/^VmHWM:/ {print $2}' "/proc/$REMIT_PID/status")

say "results ($CONNECTIONS connections, $DURATION after $WARMUP warm-up, generator $LOADGEN_THREADS threads, $(nproc) cores shared by all)"
"$LOADGEN" report "$RESULTS" --rss-kib "$RSS_KIB" --hwm-kib "$HWM_KIB"
if [[ -s $WORK/writer.txt ]]; then
    cat "$WORK/writer.txt"
fi
if grep -q '"errors":[1-9]' "$RESULTS"; then
    echo "note: some runs had errors; rerun with KEEP=1 and see $RESULTS and remit.log" >&2
fi
if [[ -n ${RESULTS_COPY:-} ]]; then
    cp "$RESULTS" "$RESULTS_COPY"
fi

if [[ ${DECISION:-0} == 1 ]]; then
    say "decision path alone (in process; includes 64 concurrent callers of authorize)"
    (cd "$ROOT" && cargo bench -p control --bench decision)
fi
