#!/usr/bin/env bash
# Fuzz every target for a bounded time: installs cargo-fuzz if missing (pinned), builds the
# targets, seeds the corpora (fuzz/seeds.py, from ../shared/vectors and the repository's tests),
# runs each target for FUZZ_SECONDS (default 30), prints the executions of each, and fails if
# any target crashed or hung (the reproducer stays in fuzz/artifacts/<target>/).
#
#   FUZZ_SECONDS=300 fuzz/run.sh                 # longer runs
#   FUZZ_SEED=0 fuzz/run.sh                      # a random seed (default 1: CI repeats one path,
#                                                # so a red run is reproducible, not luck)
#   FUZZ_TARGETS="bearer_token config" fuzz/run.sh
#   FUZZ_SANITIZER=address fuzz/run.sh           # ASan (needs nightly, or RUSTC_BOOTSTRAP=1)
#   FUZZ_BUILD_ONLY=1 fuzz/run.sh                # the build alone (.ci/run makes it in the
#                                                # background; its run then finds it fresh)
#
# Each target also has an outer bound, FUZZ_SECONDS + FUZZ_GRACE (default 120 s, for reading a
# grown corpus at the start and writing a reproducer at the end): libFuzzer's own timeout does
# not always end the process (seen once: after an input over -timeout it stayed blocked, its
# main thread in a futex wait), and a hung target must fail the run, not hold it.
#
# Replay one input: cargo fuzz run -O -a -s none <target> fuzz/artifacts/<target>/<file>
set -euo pipefail
cd "$(dirname "$0")"
# `bounded`: a target's bound, which a TERM to this script (.ci/run's bound) also stops.
source ../.ci/bounded.sh

CARGO_FUZZ_VERSION=0.13.2
FUZZ_SECONDS="${FUZZ_SECONDS:-30}"
FUZZ_SEED="${FUZZ_SEED:-1}"
FUZZ_GRACE="${FUZZ_GRACE:-120}"
SANITIZER="${FUZZ_SANITIZER:-none}"
VECTORS="${FUZZ_VECTORS:-$PWD/../../shared/vectors}"

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
  cargo install cargo-fuzz --locked --version "$CARGO_FUZZ_VERSION"
fi

# Release code with debug assertions and overflow checks (-O -a): fast, yet an overflow panics.
# No sanitizer by default: edgegate and its Rust dependencies are safe Rust, the C in aws-lc is
# not instrumented by ASan either, and stable Rust has no -Zsanitizer.
flags=(-O -a -s "$SANITIZER")
if [ "$SANITIZER" != none ] && ! rustc --version | grep -q nightly; then
  export RUSTC_BOOTSTRAP=1
fi

# cargo fuzz has no --locked: check the lock file first, so CI builds exactly what was tested.
cargo metadata --locked --format-version 1 >/dev/null

targets="${FUZZ_TARGETS:-$(cargo fuzz list)}"
echo "fuzz: building $(echo $targets | wc -w) targets (sanitizer: $SANITIZER)"
build_start=$SECONDS
cargo fuzz build "${flags[@]}"
echo "fuzz: build took $((SECONDS - build_start)) s"
if [ -n "${FUZZ_BUILD_ONLY:-}" ]; then
  echo "fuzz: FUZZ_BUILD_ONLY=1: built, not run"
  exit 0
fi

python3 seeds.py "$VECTORS"

failed=()
summary=()
for target in $targets; do
  log="target/fuzz-$target.log"
  # Only this run's reproducers count (a fixed one is kept as a regression test, not here).
  rm -rf "artifacts/$target"
  mkdir -p target "artifacts/$target"
  echo "fuzz: $target for ${FUZZ_SECONDS} s"
  # -timeout: one input taking 10 s is a finding (a hostile input must not be that expensive).
  rc=0
  bounded "$((FUZZ_SECONDS + FUZZ_GRACE))" \
    cargo fuzz run "${flags[@]}" "$target" -- \
      -max_total_time="$FUZZ_SECONDS" -seed="$FUZZ_SEED" -timeout=10 -rss_limit_mb=2048 \
      -print_final_stats=1 >"$log" 2>&1 || rc=$?
  case $rc in
    0) status=ok ;;
    124 | 137) status=HUNG ;;
    *) status=CRASH ;;
  esac
  if [ "$status" != ok ]; then
    failed+=("$target")
    [ "$status" = HUNG ] && echo "fuzz: $target still running after $((FUZZ_SECONDS + FUZZ_GRACE)) s: stopped"
    tail -n 40 "$log"
  fi
  # -a: the log quotes fuzz inputs, which are binary.
  execs=$(grep -ao 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$' || echo '?')
  cov=$(grep -ao 'cov: [0-9]*' "$log" | tail -n 1 | grep -o '[0-9]*$' || echo '?')
  corpus=$(find "corpus/$target" -type f | wc -l)
  summary+=("$(printf '%-18s %-6s %10s executions %6s edges %6s corpus inputs' \
    "$target" "$status" "$execs" "$cov" "$corpus")")
done

echo
echo "fuzz summary (${FUZZ_SECONDS} s per target):"
printf '  %s\n' "${summary[@]}"
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzz: crashed or hung: ${failed[*]}; reproducers (a hung target may have none):" >&2
  for target in "${failed[@]}"; do
    ls "artifacts/$target" >&2
  done
  exit 1
fi
echo "fuzz: no crash"
