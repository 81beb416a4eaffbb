"""Plot `cargo xtask bench delta` results: bytes on the wire per tool and pair (as % of a full
zstd -19 transfer), with the receiving side's peak memory written on each bar.

usage: python plot_delta.py RESULTS.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.load(open(sys.argv[1]))
pairs = results["pairs"]
fig, axes = plt.subplots(len(pairs), 1, figsize=(9, 2.6 + 0.45 * 8 * len(pairs)), squeeze=False)
for ax, pair in zip(axes[:, 0], pairs):
    rows = [r for r in pair["rows"] if r.get("wire_bytes")]
    rows.sort(key=lambda r: r["wire_bytes"])
    full = pair["full_bytes"]
    names = [r["tool"] for r in rows]
    values = [100.0 * r["wire_bytes"] / full for r in rows]
    colours = []
    for r in rows:
        if r["tool"].startswith("cardeploy"):
            colours.append("#1f77b4")
        elif r.get("peak_rss_kib") and r["peak_rss_kib"] > 64 * 1024:
            colours.append("#bbbbbb")
        else:
            colours.append("#7f7f7f")
    bars = ax.barh(names, values, color=colours)
    for bar, r in zip(bars, rows):
        rss = r.get("peak_rss_kib")
        label = f"{bar.get_width():.1f} %"
        label += f"  ({rss / 1024:.0f} MiB)" if rss else "  (model)"
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, " " + label, va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("bytes on the wire, % of full zstd -19 (log); receiving-side peak RSS in brackets")
    ax.set_title(pair["title"], fontsize=10)
    ax.set_xlim(min(values) / 2, max(values) * 8)
fig.suptitle("cardeploy bench delta (light grey: needs more than 64 MiB to apply)", fontsize=11)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
