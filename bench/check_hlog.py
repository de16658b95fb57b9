"""Independent check of a dsan-bench .hlog: reads it with the `hdrhistogram`
Python package (HdrHistogram's own log format reader) and compares every
tagged histogram's count and percentiles with what dsan-bench reported in
summary.json.

usage: check_hlog.py OUT_DIR    (exit 0 when everything matches)
"""
import json
import os
import sys

from hdrh.log import HistogramLogReader


def value_at_quantile(h, q):
    """The value at quantile q with HdrHistogram's rank rule ceil(q * count)
    (the Python package's own getter rounds the rank instead), walking the
    decoded counts."""
    import math

    target = max(1, math.ceil(q * h.get_total_count()))
    total = 0
    for item in h.get_recorded_iterator():
        total += item.count_at_value_iterated_to
        if total >= target:
            return h.get_highest_equivalent_value(item.value_iterated_to)
    return h.get_max_value()


def main():
    out = sys.argv[1]
    summary = json.load(open(os.path.join(out, "summary.json")))
    want = {r["tag"]: r for r in summary["results"]}
    # The reader needs a template histogram with the writer's bounds.
    from hdrh.histogram import HdrHistogram

    reader = HistogramLogReader(os.path.join(out, "bench.hlog"), HdrHistogram(1, 10_000_000_000, 3))
    seen = 0
    while True:
        h = reader.get_next_interval_histogram()
        if h is None:
            break
        tag = h.get_tag()
        r = want.get(tag)
        if r is None:
            print(f"unexpected tag {tag}")
            return 1
        seen += 1
        if h.get_total_count() != r["count"]:
            print(f"{tag}: count {h.get_total_count()} != {r['count']}")
            return 1
        for key, q in [("p50_ns", 0.5), ("p90_ns", 0.9), ("p99_ns", 0.99), ("p999_ns", 0.999)]:
            if r[key] is None:
                continue
            got = value_at_quantile(h, q)
            if got != r[key]:
                print(f"{tag}: {key} {got} != {r[key]}")
                return 1
        if r["max_ns"] is not None and h.get_max_value() != r["max_ns"]:
            print(f"{tag}: max {h.get_max_value()} != {r['max_ns']}")
            return 1
    if seen != len(want):
        print(f"read {seen} histograms, summary has {len(want)}")
        return 1
    print(f"ok: {seen} histograms match")
    return 0


if __name__ == "__main__":
    sys.exit(main())
