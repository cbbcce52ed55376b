# shellcheck shell=bash
# Sourced by .ci/run after .ci/bounded.sh: the long builds run beside the tests, in the
# background at the lowest CPU priority.
#
#   lane NAME NICE DURATION COMMAND...  start COMMAND at nice NICE (15-19) under a time bound
#                                       of its own (`timeout --kill-after=30s DURATION`), its
#                                       output in a log
#   lane_join NAME                      wait for it, print its log, return its status
#
# Why: on a cold machine (2026-12-07, every cache empty) the builds that need nothing from the
# tests (the fuzz targets, the instrumented PGO build, the container image) took 25 of a run's
# 41 minutes one after the other, while the test steps left a core idle much of their time
# (read off /proc/stat: the SQLite step 62 % busy, the PostgreSQL suite 25 % over 338 s,
# schemathesis 47 %). A nice-19 task gets about 1.5 % of a core against a busy nice-0 one, so
# the tests keep the CPU whenever they want it and the builds take what the tests leave (not
# all of it: beside the lanes the tests ran 15-55 % longer, the PostgreSQL suite most, likely
# the disk and memory the builds share). Among the lanes, the one the foreground needs first
# gets the lower nice value (each step of nice is about 1.25 times the CPU share).
#
# A TERM or INT to .ci/run stops every running lane (each lane's timeout passes the signal to
# its own process group), and so does the script's exit: a failed step does not leave builds
# running on after it. A dockerd that the image lane started is in that lane's group: a run that
# fails before the image's join stops it too (a later run starts it again).
#
# Disk: the three builds are on disk at once, beside the tests' target/debug (on a cold run about
# 9 GB in all; the fuzz and PGO folders are removed once their step passed).

declare -A lane_pid=() lane_began=()
LANE_LOGS=$(mktemp -d)
# The epoch second at which the sourcing script's SECONDS was 0: a lane's end, read off its
# log's last write, in the script's own seconds.
LANES_EPOCH=$(($(date +%s) - SECONDS))

lane() {
  local name=$1 niceness=$2
  shift 2
  # exec: the pid recorded is timeout's, which a TERM to it hands on to the lane's group.
  (exec nice -n "$niceness" timeout --kill-after=30s "$@") >"$LANE_LOGS/$name.log" 2>&1 &
  lane_pid[$name]=$!
  lane_began[$name]=$SECONDS
  printf '(lane %s: started in the background at %d s, nice %d, bound %s)\n' \
    "$name" "$SECONDS" "$niceness" "$1"
}

lane_join() {
  local name=$1 status=0
  wait "${lane_pid[$name]}" || status=$?
  unset "lane_pid[$name]"
  printf '(lane %s: from %d s, its last output at %d s, joined at %d s, exit status %d; its output follows)\n' \
    "$name" "${lane_began[$name]}" "$(($(stat -c %Y "$LANE_LOGS/$name.log") - LANES_EPOCH))" \
    "$SECONDS" "$status"
  cat "$LANE_LOGS/$name.log"
  if [ "$status" = 124 ] || [ "$status" = 137 ]; then
    echo "lane $name: still running at its bound: stopped" >&2
  fi
  return "$status"
}

# The lanes still running, signalled: a lane that has ended gave its process id back, and the
# kernel may have handed it to an unrelated process since (a cold run starts tens of thousands).
lanes_term() {
  local pid running
  running=$(jobs -rp)
  for pid in "${lane_pid[@]}"; do
    if grep -qx "$pid" <<<"$running"; then kill -TERM "$pid" 2>/dev/null || true; fi
  done
}
lanes_kill() {
  local pid
  lanes_term
  for pid in "${lane_pid[@]}"; do wait "$pid" 2>/dev/null || true; done
  lane_pid=()
}

# `renice_tree VALUE NAME...`: every thread of the named daemons to nice VALUE (a process's
# threads each have their own, and a child starts with that of the thread that made it).
renice_tree() {
  local value=$1 pid
  shift
  for pid in $(pidof "$@" 2>/dev/null || true); do
    # shellcheck disable=SC2046
    python3 -c 'import os, sys
for t in sys.argv[2:]:
    try: os.setpriority(os.PRIO_PROCESS, int(t), int(sys.argv[1]))
    except (ProcessLookupError, PermissionError): pass' "$value" $(ls "/proc/$pid/task" 2>/dev/null) || true
  done
}

# A TERM or INT: every lane and the foreground step are signalled at once, so that their
# 30-second grace periods overlap and all is stopped inside the outer bound's 60 seconds.
lanes_stop() { # SIGNAL STATUS
  lanes_term
  bounded_stop "$1" "$2"
}
# A dockerd this run put at nice 19 goes back to 0 however the run ends (.ci/run sets this).
lanes_reniced=
lanes_exit() {
  local status=$1
  # A TERM now (the outer bound firing while a lane is waited for) would exit from inside this
  # trap and skip the rest; the lanes have been signalled, and the outer KILL stays the backstop.
  trap '' TERM INT
  lanes_kill
  if [ -n "$lanes_reniced" ]; then renice_tree 0 dockerd containerd; fi
  rm -rf "$LANE_LOGS"
  exit "$status"
}
trap 'lanes_stop TERM 143' TERM
trap 'lanes_stop INT 130' INT
trap 'lanes_exit $?' EXIT
