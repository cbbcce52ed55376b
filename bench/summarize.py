"""Summary of bench/load.sh: median and spread (min-max) of each scenario per server, peak RSS,
the ratios edgegate/peer, and (given the bare verify times) edgegate's share of the limit, both
median against median and round by round (each round's rate against the same round's floor and,
when they were measured again in the round, the same round's bare checks).

usage: summarize.py RESULTS RSS [BARE [ROUND_BARE]]"""

import statistics
import sys
from collections import defaultdict

results_path, rss_path = sys.argv[1], sys.argv[2]
# alg -> microseconds of one bare signature check (criterion raw/aws_lc_verify), if given
bare_us = {}
if len(sys.argv) > 3:
    bare_us = {alg: float(us) for alg, us in (l.split() for l in open(sys.argv[3]))}
# run -> alg -> microseconds: the bare checks measured again in that round, if given
bare_of_run = defaultdict(dict)
if len(sys.argv) > 4:
    for line in open(sys.argv[4]):
        run, alg, us = line.split()
        bare_of_run[run][alg] = float(us)
runs = defaultdict(list)  # (server, scenario) -> [(rps, p50, p99, extra, run)]
order = []
for line in open(results_path):
    server, scenario, run, rps, p50, p99, extra = line.rstrip("\n").split("\t")
    if scenario not in order:
        order.append(scenario)
    runs[(server, scenario)].append((int(rps), int(p50), int(p99), extra, run))
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

# Share of the limit on the server's core: a cache hit can at best answer like /healthz; a fresh
# token at best costs the /healthz time plus one bare signature check. The share is given median
# against median (the target), and round by round: each round's rate against the limit
# from the same round's /healthz, a minute or less apart, whose median moves less when the
# machine changes pace between rounds.
CACHE_HITS = ("es256", "es256_one", "hs256", "rs256")
FRESH = {"es256_fresh": "ES256", "rs256_fresh": "RS256", "eddsa_fresh": "EdDSA"}
floor = runs.get(("edgegate", "healthz"))
if floor:
    floor_rps = med([r[0] for r in floor])
    floor_of_run = {r[4]: r[0] for r in floor}
    print()
    print(f"edgegate's floor: /healthz {floor_rps:.0f} req/s ({1e6 / floor_rps:.1f} us a request)")
    print()
    print(
        "| scenario | edgegate req/s | limit on this core | share of the limit "
        "| round by round: median (min-max) |"
    )
    print("|---|---|---|---|---|")

    def limit_of(scenario, floor_rps, bare=None):
        """The limit from a floor rate and bare check times (by default the run's), or None
        for a scenario without one."""
        bare = bare or bare_us
        if scenario in CACHE_HITS:
            return floor_rps
        if scenario in FRESH and FRESH[scenario] in bare:
            return 1e6 / (1e6 / floor_rps + bare[FRESH[scenario]])
        return None

    for scenario in order:
        rows = runs.get(("edgegate", scenario))
        limit = limit_of(scenario, floor_rps)
        if not rows or limit is None:
            continue
        rps = med([r[0] for r in rows])
        if scenario in CACHE_HITS:
            how = "/healthz"
        else:
            alg = FRESH[scenario]
            how = f"1 / ({1e6 / floor_rps:.1f} + {bare_us[alg]:.1f} us {alg})"
        # Each round against its own floor and, for fresh tokens, its own bare checks when
        # they were measured again in that round.
        rounds = [
            r[0] / limit_of(scenario, floor_of_run[r[4]], bare_of_run.get(r[4]))
            for r in rows
            if r[4] in floor_of_run
        ]
        by_round = (
            f"{med(rounds):.0%} ({min(rounds):.0%}-{max(rounds):.0%})" if rounds else "-"
        )
        print(f"| {scenario} | {rps:.0f} | {limit:.0f} ({how}) | {rps / limit:.0%} | {by_round} |")
    if bare_of_run:
        print()
        print("bare checks measured in each round (us), for the round-by-round shares:")
        for run, bare in sorted(bare_of_run.items(), key=lambda kv: int(kv[0])):
            print(f"  round {run}: " + ", ".join(f"{alg} {us:.1f}" for alg, us in bare.items()))
