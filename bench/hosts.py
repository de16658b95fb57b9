#!/usr/bin/env python3
"""Idle cost and frame round trip as the lab grows.

    bench/hosts.py [--hosts 2,16,64,128] [--count 1000] [--window 5] [--out DIR]

For each host count N: brings an N-host lab up (`dsanctl lab up --hosts N`,
adaptive idle policy, af_packet), lets it settle, measures every daemon's
CPU time over a quiet window of WINDOW seconds (the sum of its threads'
run time from /proc/PID/task/*/schedstat), then measures the one-frame
round trip through two dataplanes with `dsanctl ping` from h0 to h1 and to
the last host (COUNT probes each), and takes the lab down again (also on
failure or Ctrl-C). Writes DIR/hosts.json (with the commit, the date, the
command line and the machine) and DIR/hosts.md, and prints the table.
Needs root and what scripts/setup.sh installs; traffic stays in the lab's
namespaces (198.18.0.0/24).
"""
import argparse
import glob
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DSANCTL = os.path.join(ROOT, "target", "release", "dsanctl")


def sh(*args, timeout=600):
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def daemons():
    pids = {}
    for f in glob.glob("/run/dsan/lab/*/dsand.pid"):
        host = f.split("/")[-2]
        try:
            pids[host] = int(open(f).read().strip())
        except (OSError, ValueError):
            pass
    return pids


def runtime_ns(pid):
    total = 0
    for t in glob.glob(f"/proc/{pid}/task/*/schedstat"):
        try:
            total += int(open(t).read().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return total


def pct(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))] if v else None


def ping(dst, count):
    o = sh(DSANCTL, "--json", "--socket", "/run/dsan/lab/h0/dsand.sock", "ping", dst,
           "--count", str(count), "--timeout-ms", "1000")
    if o.returncode != 0:
        raise SystemExit(f"hosts.py: ping {dst} failed: {o.stderr.strip()}")
    d = json.loads(o.stdout)
    rtt = [x / 1000 for x in d["rtt_ns"]]
    return {"sent": d["sent"], "received": d["received"], "p50_us": pct(rtt, 0.5),
            "p99_us": pct(rtt, 0.99), "p999_us": pct(rtt, 0.999), "max_us": max(rtt)}


def one(n, count, window):
    sh(DSANCTL, "lab", "down")
    o = sh(DSANCTL, "lab", "up", "--hosts", str(n), "--idle", "adaptive")
    if o.returncode != 0:
        raise SystemExit(f"hosts.py: lab up --hosts {n} failed: {o.stderr.strip()}")
    pids = daemons()
    if len(pids) != n:
        raise SystemExit(f"hosts.py: {len(pids)} daemons for {n} hosts")
    # Resolve once so that the quiet window measures nothing but idling.
    ping("198.18.0.2", 1)
    before = {h: runtime_ns(p) for h, p in pids.items()}
    t0 = time.monotonic()
    time.sleep(window)  # the measurement window
    secs = time.monotonic() - t0
    per = [(runtime_ns(p) - before[h]) / 1e9 / secs * 100 for h, p in pids.items()]
    last = f"198.18.0.{n}"
    r = {"hosts": n, "window_s": round(secs, 2),
         "idle_cpu_pct_per_daemon": {"mean": sum(per) / len(per), "max": max(per)},
         "idle_cpu_pct_all_daemons": sum(per),
         "ping_h1": ping("198.18.0.2", count), "ping_last": ping(last, count)}
    sh(DSANCTL, "lab", "down")
    return r


def cpu_stat():
    return [int(x) for x in open("/proc/stat").readline().split()[1:]]


def during(a, b):
    """Steal, idle and softirq between two /proc/stat samples, percent of all CPUs' time."""
    d = [y - x for x, y in zip(a, b)]
    t = max(sum(d[:8]), 1)
    return {"steal_pct": round(d[7] * 100 / t, 2), "idle_pct": round((d[3] + d[4]) * 100 / t, 2),
            "softirq_pct": round(d[6] * 100 / t, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hosts", default="2,16,64,128")
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--window", type=float, default=5.0)
    ap.add_argument("--out", default="bench-out/hosts")
    a = ap.parse_args()
    if not os.path.exists(DSANCTL):
        raise SystemExit(f"hosts.py: {DSANCTL} missing (cargo build --release --workspace)")
    os.makedirs(a.out, exist_ok=True)
    results = []
    stat0 = cpu_stat()
    try:
        for n in [int(x) for x in a.hosts.split(",")]:
            print(f"hosts.py: {n} hosts ...", file=sys.stderr, flush=True)
            results.append(one(n, a.count, a.window))
    finally:
        sh(DSANCTL, "lab", "down")
    # Where the binaries come from: their build-time commit and dirty flag.
    build = json.loads(sh(os.path.join(ROOT, "target", "release", "dsan-bench"), "provenance").stdout)
    commit, dirty = build["commit"], build["dirty"]
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = int(next(l.split()[1] for l in open("/proc/meminfo") if l.startswith("MemTotal"))) / 1048576
    d = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit, "dirty": dirty,
         "command": " ".join(["bench/hosts.py"] + sys.argv[1:]),
         "machine": {"cpu": cpu, "cpus": os.cpu_count(), "memory": f"{mem:.0f} GiB", "kernel": platform.release()},
         "machine_during_run": during(stat0, cpu_stat()),
         "results": results}
    json.dump(d, open(os.path.join(a.out, "hosts.json"), "w"), indent=1)
    lines = [f"commit {commit[:12]}{' (dirty)' if dirty else ''}, {d['date']}, {d['machine']['cpus']} x {cpu}, "
             f"{d['machine']['memory']}, Linux {d['machine']['kernel']}", "",
             "| hosts | idle CPU per daemon (mean / max, % of a core) | all daemons | ping h0-h1 p50 / p99 us | ping h0-last p50 / p99 us |",
             "|---|---|---|---|---|"]
    for r in results:
        c = r["idle_cpu_pct_per_daemon"]
        p1, pl = r["ping_h1"], r["ping_last"]
        lines.append(f"| {r['hosts']} | {c['mean']:.3f} / {c['max']:.3f} | {r['idle_cpu_pct_all_daemons']:.2f} "
                     f"| {p1['p50_us']:.1f} / {p1['p99_us']:.1f} | {pl['p50_us']:.1f} / {pl['p99_us']:.1f} |")
    open(os.path.join(a.out, "hosts.md"), "w").write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
