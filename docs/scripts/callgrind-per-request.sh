#!/usr/bin/env bash
# Server instructions per request, counted by callgrind (repeatable whatever else the machine
# is doing, unlike time). Usage: docs/scripts/callgrind-per-request.sh BINARY [N [ARG...]]
# ARGs go before `--listen`: `target/release/loadtest 16000 limit-server` counts the limit
# server the same way.
# Runs the server under valgrind twice per workload, with 0 and N requests from one client
# (ping-pong: PING, wait for PONG; pipelined: 16 ECHO of 64 B per write), and prints
# (Ir with N - Ir with 0) / N: the loop's cost per request, start-up and shutdown cancelled.
set -euo pipefail
bin=$1; n=${2:-16000}; shift $(( $# < 2 ? $# : 2 )); args=("$@")
here=$(cd "$(dirname "$0")" && pwd)
total() { # MODE COUNT -> the server's total instructions
    local out; out=$(mktemp -d)
    valgrind --tool=callgrind --callgrind-out-file="$out/cg.out" "$bin" "${args[@]}" --listen 127.0.0.1:0 \
        >"$out/stdout" 2>"$out/stderr" &
    local vpid=$!
    for _ in $(seq 200); do grep -q listening "$out/stdout" 2>/dev/null && break; sleep 0.1; done
    local port; port=$(sed -n 's/listening on 127.0.0.1://p' "$out/stdout")
    python3 "$here/callgrind-drive.py" "$port" "$2" "$1"
    kill -TERM $vpid; wait $vpid || true
    awk '/^(summary|totals):/ {print $2; exit}' "$out/cg.out"; rm -r "$out"
}
for mode in ping pipe; do
    zero=$(total $mode 0); with=$(total $mode "$n")
    echo "$mode: $(( (with - zero) / n )) instructions per request"
done
