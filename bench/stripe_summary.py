"""Summary of bench/stripe.sh: median and spread (min-max) of the sync, webhook and reconcile runs.

usage: stripe_summary.py SYNC_TSV WEBHOOK_TSV OBJECTS_PER_SYNC [RECONCILE_TSV EVENTS]"""

import statistics
import sys

sync_path, webhook_path, objects = sys.argv[1], sys.argv[2], int(sys.argv[3])


def cell(values, fmt="{:.2f}"):
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def read_runs(path):
    """Per backend: (first s, its VmHWM MiB, second s, VmHWM after both MiB) of each run."""
    runs = {}
    for line in open(path):
        backend, _run, s1, _ms1, rss1, s2, _ms2, rss2 = line.rstrip("\n").split("\t")
        runs.setdefault(backend, []).append(
            (float(s1), int(rss1) / 1024, float(s2), int(rss2) / 1024)
        )
    return runs


def print_runs(runs, first_heading, rate_heading, second_heading, items):
    """One table row per backend: first run, items per second, then the rerun."""
    print()
    print(
        f"| database | {first_heading} | {rate_heading} | VmHWM after it MiB "
        f"| {second_heading} | VmHWM after both MiB |"
    )
    print("|---|---|---|---|---|---|")
    for backend, rows in runs.items():
        first, rss1, second, rss2 = (list(c) for c in zip(*rows))
        print(
            f"| {backend} | {cell(first)} | {cell([items / s for s in first], '{:.0f}')} "
            f"| {cell(rss1, '{:.1f}')} | {cell(second)} | {cell(rss2, '{:.1f}')} |"
        )


sync = read_runs(sync_path)
if sync:
    print_runs(sync, "first sync s", "objects/s", "unchanged sync s", objects)
    worst = max(r[3] for rows in sync.values() for r in rows)
    print(f"\nhighest VmHWM of any sync run: {worst:.1f} MiB (target: under 100 MB)")

webhook = []
for line in open(webhook_path):
    _run, rps, p50, p99, requests, duplicates, rss = line.rstrip("\n").split("\t")
    webhook.append((int(rps), int(p50) / 1000, int(p99) / 1000, int(requests), int(duplicates),
                    int(rss) / 1024))
if webhook:
    rps, p50, p99, requests, duplicates, rss = (list(c) for c in zip(*webhook))
    print()
    print("| deliveries per run | duplicates answered | events/s | p50 ms | p99 ms | VmHWM MiB |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {requests[0]} | {duplicates[0]} | {cell(rps, '{:.0f}')} | {cell(p50)} "
        f"| {cell(p99)} | {cell(rss, '{:.1f}')} |"
    )

if len(sys.argv) > 5:
    events = int(sys.argv[5])
    reconcile = read_runs(sys.argv[4])
    if reconcile:
        print_runs(
            reconcile,
            f"reconcile {events} events s",
            "events/s",
            "rerun (all already applied) s",
            events,
        )
