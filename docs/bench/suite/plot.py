"""Draws the percentile curves of a dsan-bench suite run, as the HdrHistogram
plotter does: x is 1/(1-percentile) on a log axis, y the latency.

usage: plot.py OUT_DIR OUT.png   (reads OUT_DIR/connect-*-connected.hgrm)
"""
import glob
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read(path):
    xs, ys = [], []
    with open(path) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 4 and not line.startswith("#"):
                try:
                    value, q = float(parts[0]), float(parts[1])
                except ValueError:
                    continue
                if q < 1.0:
                    xs.append(1.0 / (1.0 - q))
                    ys.append(value)
    return xs, ys


def main():
    out_dir, png = sys.argv[1], sys.argv[2]
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for path in sorted(glob.glob(os.path.join(out_dir, "connect-*-connected.hgrm"))):
        xs, ys = read(path)
        if not xs:
            continue
        label = os.path.basename(path)[len("connect-"):-len("-connected.hgrm")]
        ax.plot(xs, ys, label=label, linestyle="-" if "dsan" in label else "--")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ticks = [1, 2, 10, 100, 1000, 10000]
    ax.set_xticks(ticks)
    ax.set_xticklabels(["0%", "50%", "90%", "99%", "99.9%", "99.99%"])
    ax.set_xlabel("percentile")
    ax.set_ylabel("connect latency (us)")
    ax.set_title("dsan (switch + SAN provider) vs kernel TCP, connect until connected")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=100)


if __name__ == "__main__":
    main()
