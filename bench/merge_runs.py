#!/usr/bin/env python3
"""Merges single runs of `dsan-bench data --repeat 1 --json` of one build
into one file that `dsan-bench compare` reads: each row's `rates`,
`ratio_to_tcp_runs`, `cpu_runs` and `cpu_ratio_to_tcp_runs` are the runs'
lists joined (the first file's other fields are kept).

    bench/merge_runs.py OUT.json RUN1.json RUN2.json ...
"""
import json, sys
if len(sys.argv) < 3:
    sys.exit(__doc__)
out, files = sys.argv[1], sys.argv[2:]
docs = [json.load(open(f)) for f in files]
base = docs[0]
key = lambda r: (r.get("test"), r.get("path"), r.get("mtu"), r.get("port"), r.get("idle"))
rows = {key(r): r for r in base["results"]}
for d in docs[1:]:
    for r in d["results"]:
        b = rows.get(key(r))
        if b is None:
            continue
        for f in ("rates", "ratio_to_tcp_runs", "cpu_runs", "cpu_ratio_to_tcp_runs"):
            if isinstance(r.get(f), list) and isinstance(b.get(f), list):
                b[f] = b[f] + r[f]
base["merged_from"] = [f.split("/")[-1] for f in files]
base["note"] = f"{len(files)} single runs (dsan-bench data --repeat 1) of one build, alternating with the other build, merged"
json.dump(base, open(out, "w"), indent=1)
