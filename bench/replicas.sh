#!/usr/bin/env bash
# Replicas on one PostgreSQL: the calls per second of one `remit serve` and of three, under the
# same client load (DPoP ES256, a fresh proof per call, so each call's decision also spends its
# proof in the store), in one run on one machine. Each replica has its own tasks, split evenly
# among the connections, and its own public URL (so that the generator can dial it directly:
# a proof names the URL it is sent to); they share the store, its audit chain and the chain
# lock, which is what this measures. Prints the table and, per run, the writers' batches and
# how long each batch held the chain lock (`remit_store_write_chain_lock_held_seconds_total`).
#
#   bash bench/replicas.sh                      # after `cargo build --release -p remit -p loadgen`
#   DURATION=20s CONNECTIONS=48 bash bench/replicas.sh
#   POSTGRES_URL=postgres://postgres@127.0.0.1:5432/test bash bench/replicas.sh   # the default
#
# Everything listens on 127.0.0.1 and is stopped on exit; each run uses a fresh schema,
# dropped at the end.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
CONNECTIONS=${CONNECTIONS:-48}
LOADGEN_THREADS=${LOADGEN_THREADS:-2}
POSTGRES_URL=${POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/test}
BASE_PORT=${BASE_PORT:-$((20000 + RANDOM % 20000))}
UP_PORT=$BASE_PORT
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
LOADGEN=$TARGET/release/loadgen
REMIT=$TARGET/release/remit
CLK_TCK=$(getconf CLK_TCK 2>/dev/null || echo 100)
for binary in "$LOADGEN" "$REMIT"; do
    [[ -x $binary ]] || { echo "error: $binary is missing; build it first" >&2; exit 1; }
done

WORK=$(mktemp -d "${TMPDIR:-/tmp}/remit-replicas.XXXXXX")
PIDS=()
SCHEMAS=()
cleanup() {
    local pid schema
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$pid" 2>/dev/null || true
    done
    for schema in "${SCHEMAS[@]}"; do
        psql -q "$POSTGRES_URL" -c "DROP SCHEMA IF EXISTS $schema CASCADE" >/dev/null 2>&1 || true
    done
    [[ ${KEEP:-0} == 1 ]] && echo "work directory kept: $WORK" >&2 || rm -rf "$WORK"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

say() { printf '\n== %s\n' "$*" >&2; }
wait_port() {
    for _ in $(seq 100); do
        (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0
        sleep 0.1
    done
    echo "error: nothing listens on port $1; see $WORK/*.log" >&2
    exit 1
}

say "machine"
echo "$(nproc) cores: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')" >&2
echo "load average: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
echo "PostgreSQL: $(psql -tA "$POSTGRES_URL" -c 'SHOW server_version') (synchronous_commit $(psql -tA "$POSTGRES_URL" -c 'SHOW synchronous_commit'))" >&2

"$LOADGEN" upstream --listen "127.0.0.1:$UP_PORT" >"$WORK/upstream.log" 2>&1 &
PIDS+=($!)
wait_port "$UP_PORT"
"$LOADGEN" keygen --alg es256 --private "$WORK/es256.jwk" --public "$WORK/es256.pub.jwk" >/dev/null

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
SCOPES='[{"tool":"fast","actions":["list_issues"],"resources":["acme/*"]}]'
HTTP_PATH=/repos/acme/api/issues

# The writer counters of every replica of a run, summed: batches, operations, committing and
# chain-lock seconds.
counters() {
    local port
    for port in "$@"; do curl -fsS "http://127.0.0.1:$port/metrics"; done | awk '
        /^remit_store_write_batches_total / {v[1] += $2}
        /^remit_store_write_operations_total / {v[2] += $2}
        /^remit_store_write_committing_seconds_total / {v[3] += $2}
        /^remit_store_write_chain_lock_held_seconds_total / {v[4] += $2}
        END {for (i = 1; i <= 4; i++) printf "%s ", v[i] + 0}'
}

run_replicas() { # run_replicas COUNT
    local count=$1 schema="remit_bench_$$_$1" ports=() pids=() i
    SCHEMAS+=("$schema")
    psql -q "$POSTGRES_URL" -c "CREATE SCHEMA $schema" >/dev/null
    local store="$POSTGRES_URL?options=-c%20search_path%3D$schema"
    for i in $(seq "$count"); do
        local port=$((BASE_PORT + 10 * count + i))
        ports+=("$port")
        cat >"$WORK/remit-$count-$i.toml" <<EOF
listen = "127.0.0.1:$port"
public_url = "http://127.0.0.1:$port"
store = "$store"

[tasks]
max_ttl_seconds = 3600
max_budget = 10000

[gateway]
rate_per_agent = 1000000
burst_per_agent = 1000000
rate_per_task = 1000000
burst_per_task = 1000000

[[tools]]
name = "fast"
kind = "http"
upstream = "http://127.0.0.1:$UP_PORT"
auth = "none"
routes = [
  { method = "GET", path = "/repos/{owner}/{repo}/issues", action = "list_issues", class = "read", resource = "{owner}/{repo}" },
]
EOF
    done
    "$REMIT" --config "$WORK/remit-$count-1.toml" agent create bench --owner bench@example.org \
        --key "$WORK/es256.pub.jwk" >/dev/null
    for i in $(seq "$count"); do
        "$REMIT" --config "$WORK/remit-$count-$i.toml" serve >"$WORK/remit-$count-$i.log" 2>&1 &
        pids+=($!)
        PIDS+=($!)
    done
    for i in $(seq "$count"); do wait_port "${ports[$((i - 1))]}"; done
    local per=$((CONNECTIONS / count))
    for i in $(seq "$count"); do
        "$LOADGEN" grant --remit "http://127.0.0.1:${ports[$((i - 1))]}" --agent bench \
            --key "$WORK/es256.jwk" --scopes "$SCOPES" --count "$per" --budget 10000 \
            --ttl 3600 --out "$WORK/tokens-$count-$i.txt"
    done
    say "$count replica(s): $CONNECTIONS connections ($per each), $WARMUP warm-up + $DURATION"
    local before started loads=()
    before=$(counters "${ports[@]}")
    started=$(date +%s.%N)
    for i in $(seq "$count"); do
        "$LOADGEN" run --group "replicas" --label "$count replica(s), #$i" \
            --url "http://127.0.0.1:${ports[$((i - 1))]}/http/fast$HTTP_PATH" \
            --connections "$per" --duration "$DURATION" --warmup "$WARMUP" \
            --threads "$LOADGEN_THREADS" --clock-ticks "$CLK_TCK" --out "$RESULTS" \
            --server-pid "${pids[$((i - 1))]}" --mode dpop --key "$WORK/es256.jwk" \
            --tokens "$WORK/tokens-$count-$i.txt" >&2 &
        loads+=($!)
    done
    for pid in "${loads[@]}"; do wait "$pid"; done
    echo "$before $(counters "${ports[@]}") $started $(date +%s.%N)" | awk -v n="$count" '{
        wall = $10 - $9
        batches = $5 - $1; ops = $6 - $2; committing = $7 - $3; held = $8 - $4
        printf "- %d replica(s): %d batches, %.1f writes per batch, %.2f ms committing and %.2f ms holding the chain lock per batch; chain lock held %.0f%% of the time\n", n, batches, ops / batches, committing / batches * 1000, held / batches * 1000, held / wall * 100
    }' >>"$WORK/writer.txt"
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
}

run_replicas 1
run_replicas 3

say "results: calls per second, summed over the replicas of each run"
awk -F'"label":"' '{ split($2, a, " replica"); n = a[1]; match($0, /"rps":[0-9.]+/); rps[n] += substr($0, RSTART + 6, RLENGTH - 6); errors[n] += ($0 ~ /"errors":[1-9]/) }
    END { for (n in rps) printf "%s replica(s): %.0f calls/s%s\n", n, rps[n], errors[n] ? " (with errors: see KEEP=1)" : "";
          if (rps[1] > 0) printf "ratio: three replicas = %.2f x one replica\n", rps[3] / rps[1] }' "$RESULTS"
cat "$WORK/writer.txt"
