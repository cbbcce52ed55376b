"""Summary of bench/load.sh: median and spread (min-max) of each scenario per server, peak RSS,
and the ratios edgegate/peer."""

import statistics
import sys
from collections import defaultdict

results_path, rss_path = sys.argv[1], sys.argv[2]
runs = defaultdict(list)  # (server, scenario) -> [(rps, p50, p99, extra)]
order = []
for line in open(results_path):
    server, scenario, _run, rps, p50, p99, extra = line.rstrip("\n").split("\t")
    if scenario not in order:
        order.append(scenario)
    runs[(server, scenario)].append((int(rps), int(p50), int(p99), extra))
rss = {server: int(kib) for server, kib in (l.split() for l in open(rss_path))}


def med(values):
    return statistics.median(values)


def spread(values):
    return f"{min(values)}-{max(values)}"


def ms(us):
    return f"{us / 1000:.2f}"


print()
print("| scenario | server | req/s median (min-max) | p50 ms | p99 ms | other |")
print("|---|---|---|---|---|---|")
for scenario in order:
    for server in ("edgegate", "peer"):
        rows = runs.get((server, scenario))
        if not rows:
            continue
        rps = [r[0] for r in rows]
        p50 = [r[1] for r in rows]
        p99 = [r[2] for r in rows]
        extras = "; ".join(r[3] for r in rows if r[3])
        print(
            f"| {scenario} | {server} | {med(rps):.0f} ({spread(rps)}) | {ms(med(p50))} "
            f"| {ms(med(p99))} | {extras} |"
        )

print()
print("| server | peak RSS (VmHWM) |")
print("|---|---|")
for server, kib in rss.items():
    print(f"| {server} | {kib / 1024:.1f} MiB |")

print()
print("| scenario | edgegate/peer req/s | edgegate/peer p99 |")
print("|---|---|---|")
for scenario in order:
    e, p = runs.get(("edgegate", scenario)), runs.get(("peer", scenario))
    if not (e and p):
        continue
    print(
        f"| {scenario} | {med([r[0] for r in e]) / med([r[0] for r in p]):.2f}x "
        f"| {med([r[2] for r in e]) / med([r[2] for r in p]):.2f}x |"
    )
if "edgegate" in rss and "peer" in rss:
    print(f"| peak RSS | {rss['edgegate'] / rss['peer']:.2f}x | |")

for server in ("edgegate", "peer"):
    paced, flood = runs.get((server, "paced")), runs.get((server, "flood"))
    if paced and flood:
        kept = med([r[0] for r in flood]) / med([r[0] for r in paced])
        print(f"\n{server}: valid throughput under the flood = {kept:.1%} of the paced run without it")
