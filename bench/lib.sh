# Shared by the bench scripts (sourced): a scratch folder and the processes a script started,
# both removed on exit however the script ends. A script may define `cleanup_extra` for more.
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    if declare -F cleanup_extra >/dev/null; then
        cleanup_extra
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT
