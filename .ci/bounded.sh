# Sourced by .ci/run, fuzz/run.sh and tests/schema/run.sh: `bounded DURATION COMMAND...` runs a
# step under its own time bound, and a TERM or INT to the script stops that step too.
#
# GNU timeout puts itself and its command in a process group of their own and signals only that
# group. A step run as `timeout 20m cmd` is therefore out of reach of whatever stops the script
# (the outer timeout of .ci/run signals its own group): the script died on the TERM and the step
# ran on, orphaned, for up to its whole bound. Here the step runs in the background, the script
# waits for it (a trapped signal interrupts `wait`, where bash would defer the trap until a
# foreground command ended), and the trap hands the signal to the step's timeout, which passes
# it to its group and kills that group 30 s later if anything is left. The step's output and
# exit status are the same as those of `timeout --kill-after=30s DURATION COMMAND...`.
bounded_pid=
bounded() {
  local status=0
  timeout --kill-after=30s "$@" &
  bounded_pid=$!
  wait "$bounded_pid" || status=$?
  bounded_pid=
  return "$status"
}
bounded_stop() { # SIGNAL STATUS: stop the running step, wait for it, exit with STATUS.
  trap - TERM INT
  if [ -n "$bounded_pid" ]; then
    kill -TERM "$bounded_pid" 2>/dev/null || true
    wait "$bounded_pid" 2>/dev/null || true
  fi
  echo "$1 received: stopped" >&2
  exit "$2"
}
trap 'bounded_stop TERM 143' TERM
trap 'bounded_stop INT 130' INT
