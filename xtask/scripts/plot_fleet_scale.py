"""Plot `cargo xtask bench fleet` results: what the twin costs against fleet size — memory per
idle connected car, desired-state push latency (p99) and the fleet-wide push (p99), and the time
cars take to connect.

usage: python plot_fleet_scale.py RESULTS.json OUT.png
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

results = json.load(open(sys.argv[1]))
points = results["points"]
cars = [p["cars"] for p in points]
fig, (mem, lat, con) = plt.subplots(1, 3, figsize=(14, 4.2))

mem.plot(cars, [p["kib_per_car"] for p in points], "o-", label="idle")
mem.plot(cars, [p["kib_per_car_desired"] for p in points], "s--", label="holding a desired state")
mem.axhline(40, color="#d62728", linestyle=":", label="target 40 KiB")
mem.set_xlabel("connected cars")
mem.set_ylabel("twin RSS per car, KiB (all instances)")
mem.set_ylim(bottom=0)
mem.legend(fontsize=8)

lat.plot(cars, [p["push_p99_ms"] for p in points], "o-", label="one car's push, p99")
lat.plot(cars, [p["fanout_p99_ms"] for p in points], "s-", label="fleet-wide push, p99")
lat.axhline(2000, color="#d62728", linestyle=":", label="target 2 s")
lat.set_xlabel("connected cars")
lat.set_ylabel("ms")
lat.set_ylim(bottom=0)
lat.legend(fontsize=8)

con.plot(cars, [p["connect_secs"] for p in points], "o-", label="new cars connecting")
storm = results.get("storm")
if storm:
    con.plot([storm["cars"]], [storm["back_secs"]], "r*", markersize=12, label="all back after a restart")
    con.axhline(120, color="#d62728", linestyle=":", label="target 2 min")
con.set_xlabel("connected cars")
con.set_ylabel("seconds")
con.set_ylim(bottom=0)
con.legend(fontsize=8)

fig.suptitle("cardeploy twin: cost against fleet size (instances on one PostgreSQL)", fontsize=11)
fig.tight_layout()
fig.savefig(sys.argv[2], dpi=110)
