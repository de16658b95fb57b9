#!/usr/bin/env bash
# Unmodified applications over the SAN and over kernel TCP, side by side on
# the same lab veth: redis-benchmark against redis-server, wrk against
# nginx, and sockperf ping-pong (the tool libvma/XLIO users measure with:
# an independent yardstick; its latency is half a round trip), with both programs preloaded with libdsan_preload.so (the SAN) and
# without (kernel TCP), alternating: REPEAT runs, the SAN first in odd runs
# and kernel TCP first in even ones.
#
#   bench/apps.sh [--out DIR] [--requests N] [--clients N] [--duration S] [--idle POLICY] [--mtu N] [--repeat N]
#
# Brings the two-host lab up (and down again at the end, also on failure),
# prints a table (median ratio of the runs and its range), and writes
# DIR/apps.json (every run; the commit and dirty flag the binaries were built
# from, the date, the command line, the machine and its steal time during
# the run) and DIR/apps.md. Needs root and what scripts/setup.sh installs.
# Network traffic stays inside the lab's namespaces (198.18.0.0/24).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out=bench-out/apps
requests=200000
clients=50
duration=5
idle=adaptive
mtu=()
repeat=3
cmdline="bench/apps.sh $*"
while (($#)); do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --requests) requests=$2; shift 2 ;;
    --clients) clients=$2; shift 2 ;;
    --duration) duration=$2; shift 2 ;;
    --idle) idle=$2; shift 2 ;;
    --mtu) mtu=(--mtu "$2"); shift 2 ;;
    --repeat) repeat=$2; shift 2 ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "apps.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
bin=$root/target/release
lib=$bin/libdsan_preload.so
for p in redis-server redis-benchmark nginx wrk sockperf; do
  command -v "$p" >/dev/null || { echo "apps.sh: $p missing (run scripts/setup.sh)" >&2; exit 1; }
done
[ -e "$lib" ] || { echo "apps.sh: $lib missing (cargo build --release --workspace)" >&2; exit 1; }
[[ "$repeat" =~ ^[1-9][0-9]*$ ]] || { echo "apps.sh: --repeat must be a positive number" >&2; exit 2; }
# Where the binaries come from: their build-time commit and dirty flag.
build=$("$bin/dsan-bench" provenance)
mkdir -p "$out"
work=$(mktemp -d /tmp/dsan-apps.XXXXXX)
srv=
cleanup() {
  [ -n "$srv" ] && kill -- "-$srv" 2>/dev/null || true
  "$bin/dsanctl" lab down >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT
"$bin/dsanctl" lab down >/dev/null 2>&1 || true
"$bin/dsanctl" lab up --idle "$idle" "${mtu[@]}" >/dev/null

in_host() { # host preload(0|1) prog args...
  local h=$1 pre=$2; shift 2
  if [ "$pre" = 1 ]; then
    ip netns exec "dsan-$h" env DSAN_SOCKET="/run/dsan/lab/$h/dsand.sock" LD_PRELOAD="$lib" "$@"
  else
    ip netns exec "dsan-$h" "$@"
  fi
}
start_bg() { # host preload(0|1) prog args...: a server in the background, its pid in $srv
  local h=$1 pre=$2; shift 2
  # In a process group of its own, so that stopping it stops all of it.
  if [ "$pre" = 1 ]; then
    setsid ip netns exec "dsan-$h" env DSAN_SOCKET="/run/dsan/lab/$h/dsand.sock" LD_PRELOAD="$lib" "$@" </dev/null >/dev/null 2>&1 &
  else
    setsid ip netns exec "dsan-$h" "$@" </dev/null >/dev/null 2>&1 &
  fi
  srv=$!
}
stop_bg() { # SIGTERM, then SIGKILL after 5 s
  kill -- "-$srv" 2>/dev/null || true
  for _ in $(seq 1 250); do
    kill -0 "$srv" 2>/dev/null || break
    sleep 0.02
  done
  if kill -0 "$srv" 2>/dev/null; then
    echo "apps.sh: $(ps -o args= -p "$srv") did not stop on SIGTERM within 5 s; killed" >&2
    kill -9 -- "-$srv" 2>/dev/null || true
  fi
  wait "$srv" 2>/dev/null || true
  srv=
}
wait_port() { # host port
  for _ in $(seq 1 500); do
    [ -n "$(ip netns exec "dsan-$1" ss -Hltn "sport = :$2")" ] && return 0
    sleep 0.02
  done
  echo "apps.sh: nothing listens on $1:$2" >&2; exit 1
}
# h1's daemon learns of kernel listeners within 150 ms; a preloaded client
# waits for that (else a SAN connect is refused, as for a closed port).
settle() { sleep 0.3; }

mkdir -p "$work/www"
head -c 512 /dev/zero | tr '\0' x > "$work/www/small"
cat > "$work/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
error_log $work/error.log;
pid $work/nginx.pid;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $work/body;
  proxy_temp_path $work/proxy;
  fastcgi_temp_path $work/fastcgi;
  uwsgi_temp_path $work/uwsgi;
  scgi_temp_path $work/scgi;
  keepalive_requests 1000000;
  server { listen 8080; root $work/www; }
}
EOF

results=()
run_redis() { # transport preload
  local t=$1 pre=$2 n=0
  start_bg h1 "$pre" redis-server --port 6379 --bind 0.0.0.0 --protected-mode no --save '' \
    --appendonly no --dir "$work" --logfile "$work/redis.log"
  wait_port h1 6379; settle
  for test in set get; do
    local line
    line=$(in_host h0 "$pre" timeout 300 redis-benchmark -h 198.18.0.2 -p 6379 -t "$test" \
      -n "$requests" -c "$clients" -P 1 -q --csv | grep -i "^\"$test\"")
    # "SET","rps","avg","min","p50","p95","p99","max"
    IFS=, read -r name rps avg _min p50 _p95 p99 max <<<"$(tr -d '"' <<<"$line")"
    results+=("{\"app\":\"redis-benchmark $name\",\"run\":$run,\"transport\":\"$t\",\"rps\":$rps,\"p50_ms\":$p50,\"p99_ms\":$p99,\"max_ms\":$max,\"avg_ms\":$avg}")
    n=$((n + 1))
  done
  stop_bg
}
run_wrk() { # transport preload
  local t=$1 pre=$2
  start_bg h1 "$pre" nginx -p "$work" -c "$work/nginx.conf"
  wait_port h1 8080; settle
  local o
  o=$(in_host h0 "$pre" timeout $((duration + 60)) wrk -t2 -c"$clients" -d"${duration}s" --latency \
    http://198.18.0.2:8080/small)
  local rps p50 p99 errors
  rps=$(awk '/^Requests\/sec:/ {print $2}' <<<"$o")
  # wrk prints latencies with units (us, ms, s): in milliseconds.
  ms() { awk -v v="$1" 'BEGIN { u=v; sub(/[0-9.]+/, "", u); x=v+0; if (u=="us") x/=1000; else if (u=="s") x*=1000; printf "%.3f", x }'; }
  p50=$(ms "$(awk '$1=="50%" {print $2}' <<<"$o")")
  p99=$(ms "$(awk '$1=="99%" {print $2}' <<<"$o")")
  errors=$(grep -c "Socket errors" <<<"$o" || true)
  results+=("{\"app\":\"wrk GET 512 B\",\"run\":$run,\"transport\":\"$t\",\"rps\":$rps,\"p50_ms\":$p50,\"p99_ms\":$p99,\"socket_error_lines\":$errors}")
  stop_bg
}

stat0=$(head -1 /proc/stat)
run_sockperf() { # transport preload
  local t=$1 pre=$2
  start_bg h1 "$pre" sockperf server --tcp -i 0.0.0.0 -p 11111
  wait_port h1 11111; settle
  local o
  o=$(in_host h0 "$pre" timeout $((duration + 60)) sockperf ping-pong --tcp -i 198.18.0.2 -p 11111 \
    -t "$duration" -m 64 2>&1)
  # "[Valid Duration] RunTime=1.550 sec; SentMessages=12652; ReceivedMessages=12652",
  # "---> percentile 50.000 =   58.594" (microseconds, half a round trip)
  local secs msgs p50 p99
  secs=$(sed -n 's/.*\[Valid Duration\] RunTime=\([0-9.]*\) sec.*/\1/p' <<<"$o")
  msgs=$(sed -n 's/.*\[Valid Duration\].*ReceivedMessages=\([0-9]*\).*/\1/p' <<<"$o")
  p50=$(awk '/percentile 50.000/ {printf "%.4f", $NF / 1000}' <<<"$o")
  p99=$(awk '/percentile 99.000/ {printf "%.4f", $NF / 1000}' <<<"$o")
  if [ -z "$secs" ] || [ -z "$msgs" ] || [ -z "$p50" ]; then
    echo "apps.sh: sockperf ($t) gave no figures:" >&2; echo "$o" >&2; exit 1
  fi
  results+=("{\"app\":\"sockperf ping-pong 64 B\",\"run\":$run,\"transport\":\"$t\",\"rps\":$(awk -v m="$msgs" -v s="$secs" 'BEGIN {printf "%.1f", m / s}'),\"p50_ms\":$p50,\"p99_ms\":$p99,\"latency\":\"half round trip\"}")
  stop_bg
}

echo "apps: redis-benchmark ($requests requests, $clients clients) and wrk (${duration} s, $clients connections), $repeat runs"
for run in $(seq 1 "$repeat"); do
  if [ $((run % 2)) = 1 ]; then order="san tcp"; else order="tcp san"; fi
  for t in $order; do
    echo "  run $run/$repeat: redis-benchmark, $t" >&2
    run_redis "$t" "$([ "$t" = san ] && echo 1 || echo 0)"
  done
  for t in $order; do
    echo "  run $run/$repeat: wrk, $t" >&2
    run_wrk "$t" "$([ "$t" = san ] && echo 1 || echo 0)"
  done
  for t in $order; do
    echo "  run $run/$repeat: sockperf ping-pong, $t" >&2
    run_sockperf "$t" "$([ "$t" = san ] && echo 1 || echo 0)"
  done
done
stat1=$(head -1 /proc/stat)
# Steal, idle and softirq over the run, percent of all CPUs' time.
during=$(python3 -c '
import sys
a = [int(x) for x in sys.argv[1].split()[1:]]
b = [int(x) for x in sys.argv[2].split()[1:]]
d = [y - x for x, y in zip(a, b)]
t = max(sum(d[:8]), 1)
print("{\"steal_pct\":%.2f,\"idle_pct\":%.2f,\"softirq_pct\":%.2f}" % (d[7] * 100 / t, (d[3] + d[4]) * 100 / t, d[6] * 100 / t))
' "$stat0" "$stat1")
commit=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["commit"])' "$build")
dirty=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1])["dirty"]; print("null" if d is None else str(d).lower())' "$build")
cpu=$(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)
ncpu=$(nproc)
mem=$(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)
{
  printf '{"date":"%s","commit":"%s","dirty":%s,"command":"%s","runs":%s,"order":"SAN first in odd runs, kernel TCP first in even ones","machine":{"cpu":"%s","cpus":%s,"memory":"%s","kernel":"%s"},"machine_during_run":%s,"results":[' \
    "$(date -u +%FT%TZ)" "$commit" "$dirty" "$cmdline" "$repeat" "$cpu" "$ncpu" "$mem" "$(uname -r)" "$during"
  (IFS=,; printf '%s' "${results[*]}")
  printf ']}\n'
} > "$out/apps.json"

# The table: the same generator as docs/benchmarks.md's.
"$bin/dsan-bench" tables --print apps --apps "$out/apps.json" | tee "$out/apps.md"
