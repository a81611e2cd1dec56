#!/usr/bin/env bash
# README "Serving a fleet" table: `fleet_load` against four services, one after the other, on
# this machine: the cloud_server from before deadline-aware serving (FIFO; git revision
# $FLEET_BEFORE_REV in a scratch worktree), deadline-aware, deadline-aware + batching, and
# Triton (two configurations).
# Every service runs ssdlite320_mobilenet_v3_large (random weights) with 1 torch thread.
# Writes $FLEET_OUT/<label>.json, the tables and fleet.png. Run via `make fleet-table`.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
py=${FLEET_PYTHON:?run through make fleet-table}
unset _ROS_WHEELS_BOOTSTRAP_COMPLETE  # inherited from another ROS-wheels venv it breaks ours
out=${FLEET_OUT:-$repo/out/fleet}
sizes=${FLEET_SIZES:-1,2,4,6,8,12,16,32}
duration=${FLEET_DURATION:-20}
before_rev=${FLEET_BEFORE_REV:-53929e1}
model=(--model ssdlite320_mobilenet_v3_large --weights random --threads 1)
mkdir -p "$out"
server=''
trap '[[ -n $server ]] && kill -TERM "$server" 2>/dev/null; wait' EXIT

free_port() { "$py" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# measure LABEL ENDPOINT METRICS_URL [CAPACITY_CALLS]: the sweep against the server started
# last, then stop it. Capacity is measured with 4 calls in flight unless the server queues fewer.
measure() {
  echo "== $1" >&2
  "$py" -m speculative_av.tools.fleet_load --endpoint "$2" --insecure --vehicles "$sizes" \
    --duration "$duration" --capacity "${4:-4}" ${3:+--metrics-url "$3"} --label "$1" \
    --json "$out/$1.json" | tee "$out/$1.md"
  kill -TERM "$server" && wait "$server" || true
  server=''
}

native() {  # native LABEL TREE SERVER_ARGS...: sets $port and $server
  local label=$1 tree=$2
  shift 2
  port=$(free_port)
  (cd "$tree" && exec "$py" -m speculative_av.cloud.server --host 127.0.0.1 --port "$port" \
    --insecure "${model[@]}" "$@" >/dev/null 2>"$out/$label.server.log") &
  server=$!
}

before=$out/before-tree
[[ -d $before ]] || git -C "$repo" worktree add --detach "$before" "$before_rev" >&2
native fifo-before "$before"
measure fifo-before "127.0.0.1:$port" ''

for variant in deadline:1 deadline-batch4:4; do
  label=${variant%%:*}
  metrics=$(free_port)
  native "$label" "$repo" --metrics-port "$metrics" --max-batch-size "${variant##*:}"
  measure "$label" "127.0.0.1:$port" "http://127.0.0.1:$metrics/metrics"
done

# Triton twice: its defaults (dynamic batches of up to 4, unbounded queue), and tuned for a CPU
# where a batch costs as much as its images one by one (no batching, at most 2 waiting).
for variant in triton:4:0 triton-batch1-queue2:1:2; do
  IFS=: read -r label batch queue <<<"$variant"
  grpc=$(free_port)
  metrics=$(free_port)
  "$py" -m speculative_av.cloud.triton_server "${model[@]}" --host 127.0.0.1 \
    --grpc-port "$grpc" --http-port 0 --metrics-port "$metrics" --max-batch-size "$batch" \
    --max-queue-size "$queue" >/dev/null 2>"$out/$label.server.log" &
  server=$!
  measure "$label" "kserve://127.0.0.1:$grpc/speculative_detector" \
    "http://127.0.0.1:$metrics/metrics" "$((queue > 0 && queue < 4 ? queue + 1 : 4))"
done

"$py" -m speculative_av.tools.fleet_load --replot --plot "$out/fleet.png" \
  --compare "$out"/{fifo-before,deadline,deadline-batch4,triton,triton-batch1-queue2}.json
