"""Plot `cargo xtask fleet-sim`'s timeline: the simulated cars per state over time (stacked),
the deployment's phase and the moments the run marked (creations, phases, the halt, the
time-to-live), and the twin's CPU and RSS.

usage: python plot_fleet.py TIMELINE.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

timeline = json.load(open(sys.argv[1]))
samples = timeline["samples"]
states = timeline["states"]
colours = {
    "offline": "#d9d9d9",
    "rebooting": "#9e9ac8",
    "idle": "#f0f0f0",
    "fetching": "#6baed6",
    "installing": "#2171b5",
    "trial": "#fdae6b",
    "committed": "#31a354",
    "rolled-back": "#de2d26",
    "failed": "#67000d",
}
t = [s["t"] for s in samples]
fig, (cars, phase, twin) = plt.subplots(
    3, 1, figsize=(11, 9), sharex=True, gridspec_kw={"height_ratios": [4, 1, 1.5]}
)
cars.stackplot(
    t,
    [[s["cars"][name] for s in samples] for name in states],
    labels=states,
    colors=[colours[name] for name in states],
    linewidth=0,
)
cars.set_ylabel("cars")
cars.set_title(
    f"fleet-sim: {timeline['cars']} simulated cars, steps ×{timeline['speed']:g} faster than on the road"
)
cars.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
for event in timeline["events"]:
    what = event["what"]
    if what.startswith("deploy create") or "halted" in what or "expired" in what:
        for ax in (cars, phase, twin):
            ax.axvline(event["t"], color="#444444", linewidth=0.6, linestyle="--")
        cars.annotate(
            what.replace("deploy create ", "create "),
            (event["t"], cars.get_ylim()[1]),
            rotation=90,
            fontsize=7,
            va="top",
            ha="right",
        )

# The deployment's phase, per scenario (the same axis; each scenario its own line).
for scenario in dict.fromkeys(s["scenario"] for s in samples):
    points = [(s["t"], s["deployment"]["phase"]) for s in samples if s["scenario"] == scenario]
    phase.step([p[0] for p in points], [p[1] for p in points], where="post", label=scenario)
phase.set_ylabel("phase")
phase.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)

twin.plot(t, [100 * s["twin_cpu"] for s in samples], color="#d95f02", label="CPU (% of a core)")
twin.set_ylabel("twin CPU %")
rss = twin.twinx()
rss.plot(t, [s["twin_rss_mib"] for s in samples], color="#7570b3", label="RSS (MiB)")
rss.set_ylabel("twin RSS MiB")
twin.set_xlabel("seconds since the fleet started")
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
