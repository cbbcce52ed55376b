"""Summary of bench/stripe.sh: median and spread (min-max) of the sync, webhook and reconcile runs.

usage: stripe_summary.py SYNC_TSV WEBHOOK_TSV OBJECTS_PER_SYNC [RECONCILE_TSV EVENTS]"""

import statistics
import sys

sync_path, webhook_path, objects = sys.argv[1], sys.argv[2], int(sys.argv[3])


def cell(values, fmt="{:.2f}"):
    med = statistics.median(values)
    return f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"


sync = {}
for line in open(sync_path):
    backend, _run, s1, _ms1, rss1, s2, _ms2, rss2 = line.rstrip("\n").split("\t")
    sync.setdefault(backend, []).append(
        (float(s1), int(rss1) / 1024, float(s2), int(rss2) / 1024)
    )
if sync:
    print()
    print(
        "| database | first sync s | objects/s | VmHWM after it MiB "
        "| unchanged sync s | VmHWM after both MiB |"
    )
    print("|---|---|---|---|---|---|")
    for backend, rows in sync.items():
        first, rss1, second, rss2 = (list(c) for c in zip(*rows))
        print(
            f"| {backend} | {cell(first)} | {cell([objects / s for s in first], '{:.0f}')} "
            f"| {cell(rss1, '{:.1f}')} | {cell(second)} | {cell(rss2, '{:.1f}')} |"
        )
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
    reconcile = {}
    for line in open(sys.argv[4]):
        backend, _run, s1, _ms1, rss1, s2, _ms2, rss2 = line.rstrip("\n").split("\t")
        reconcile.setdefault(backend, []).append(
            (float(s1), int(rss1) / 1024, float(s2), int(rss2) / 1024)
        )
    if reconcile:
        print()
        print(
            f"| database | reconcile {events} events s | events/s | VmHWM after it MiB "
            "| rerun (all already applied) s | VmHWM after both MiB |"
        )
        print("|---|---|---|---|---|---|")
        for backend, rows in reconcile.items():
            first, rss1, second, rss2 = (list(c) for c in zip(*rows))
            print(
                f"| {backend} | {cell(first)} | {cell([events / s for s in first], '{:.0f}')} "
                f"| {cell(rss1, '{:.1f}')} | {cell(second)} | {cell(rss2, '{:.1f}')} |"
            )
