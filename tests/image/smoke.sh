#!/usr/bin/env bash
# tests/image/smoke.sh: build edgegate's container image and smoke-test it the way Fly runs it.
# CI runs it from .ci/run under a time bound; locally: `sudo bash tests/image/smoke.sh` (docs/DEPLOY.md).
#
# Phases, each timed: base images, build, smoke. Every check prints `ok: <check>` or
# `FAIL: <check>: <why>`; the script exits 1 when a check failed, 2 when it could not get as far as
# checking (no docker, no base images, the build failed).
#
# Base images: `docker pull` when a registry answers; otherwise ../shared/tools/local-base-images.sh
# (beside the clone) builds debian:bookworm-slim and rust:1.95-bookworm locally, with Debian's
# docker.io set up with no bridge and no iptables. The Dockerfile's `# syntax=docker/dockerfile:1`
# line makes BuildKit fetch its frontend from a registry, so with no registry the image is built by
# the legacy builder, to which that line is a comment; the committed Dockerfile keeps it for Fly.
#
# Cache between runs on one machine: the base images are kept, and the builder stage is tagged
# (IMAGE's repository, tag `smoke-builder`) so its dependency layer survives `docker image prune`;
# the previous run's images are removed by id once replaced, so disk use stays flat.
#
# Containers run with --network=host only and listen on 127.0.0.1 (HOST) on a free port; they are
# removed on exit, with their volume and the PostgreSQL database made for them. dockerd is left
# running: it has no bridge and no iptables rules and listens on its unix socket only.
#
# Knobs: IMAGE (edgegate:smoke), FORCE_BASE=1 (rebuild the base images locally), SMOKE_COLD=1 (drop
# this script's images first, for a cold build), SMOKE_NO_BUILD=1 (smoke-test IMAGE as it is),
# SMOKE_BUILD_ONLY=1 (base images and build, no smoke: .ci/run builds in the background and
# smoke-tests later with SMOKE_NO_BUILD=1),
# IMAGE_BUDGET_MB (150), CONTEXT_BUDGET_MB (20), SMOKE_DRAIN_SECONDS (10),
# SMOKE_PG (postgres://postgres@127.0.0.1:5432, for psql).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
cd "$ROOT"

IMAGE=${IMAGE:-edgegate:smoke}
BUILDER_IMAGE="${IMAGE%:*}:smoke-builder"
IMAGE_BUDGET_MB=${IMAGE_BUDGET_MB:-150}
CONTEXT_BUDGET_MB=${CONTEXT_BUDGET_MB:-20}
DRAIN=${SMOKE_DRAIN_SECONDS:-10}
SMOKE_PG=${SMOKE_PG:-postgres://postgres@127.0.0.1:5432}
RUN_ID="edgegate-smoke-$$"
WORK=$(mktemp -d)
failures=0
checks=0

ok() { checks=$((checks + 1)); printf 'ok: %s\n' "$1"; }
fail() { checks=$((checks + 1)); failures=$((failures + 1)); printf 'FAIL: %s: %s\n' "$1" "$2"; }
die() { printf 'FAIL: %s: %s\n' "$1" "$2"; exit 2; }
phase() { printf '\n-- %s %s\n' "$(date -u +%T)" "$*"; }
indent() { sed -u 's/^/    /'; }   # unbuffered: build progress shows as it happens

# Debian's docker.io client first: it matches its daemon and has the legacy builder and BuildKit
# built in (a newer client without the buildx plugin refuses DOCKER_BUILDKIT=1). `type -P`, not
# `command -v`: the latter names the `docker` function below, which then calls itself until bash
# overflows its stack (a segfault, on a machine without /usr/bin/docker).
DOCKER=
pick_docker() { if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=$(type -P docker || true); fi; }
docker() { "$DOCKER" "$@"; }
pick_docker

PG_DB="edgegate_smoke_$$"
pg_made=
py_pid=
cleanup() {
  local rc=$?
  set +e
  [ -n "$py_pid" ] && kill "$py_pid" 2>/dev/null
  if [ -n "$DOCKER" ] && docker info >/dev/null 2>&1; then
    docker ps -aq --filter "label=edgegate-smoke=$RUN_ID" | xargs -r "$DOCKER" rm -f >/dev/null 2>&1
    docker volume ls -q --filter "label=edgegate-smoke=$RUN_ID" | xargs -r "$DOCKER" volume rm >/dev/null 2>&1
  fi
  if [ -n "$pg_made" ]; then
    psql "$SMOKE_PG/postgres" -qc "drop database if exists $PG_DB with (force)" >/dev/null 2>&1 || true
  fi
  rm -rf "$WORK"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 143' TERM INT

t_start=$SECONDS
# --------------------------------------------------------------------------------------------
phase "base images"
registry=no
if [ -z "${FORCE_BASE:-}" ] && [ -n "$DOCKER" ] && docker info >/dev/null 2>&1; then
  # Fails within a second when no registry resolves; the bound covers a network that drops packets.
  if timeout 60 "$DOCKER" pull -q debian:bookworm-slim >/dev/null 2>&1 \
     && timeout 600 "$DOCKER" pull -q rust:1.95-bookworm >/dev/null 2>&1; then
    registry=yes
    echo "a registry answers: base images pulled"
  fi
fi
if [ "$registry" = no ]; then
  tool="$ROOT/../shared/tools/local-base-images.sh"
  [ -f "$tool" ] || die "base images" "no registry answers and $tool is missing"
  [ "$(id -u)" = 0 ] || die "base images" "no registry answers; building base images locally needs root"
  # The tool reads the apt mirrors itself, but its pipeline fails under pipefail when
  # /etc/apt/sources.list does not exist (deb822-only hosts): hand it the mirrors.
  apt_uris() {
    { grep -h '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}'
      grep -h '^deb ' /etc/apt/sources.list 2>/dev/null | awk '{print $2}'; } || true
  }
  main_mirror=$(apt_uris | grep -v security | head -1 || true)
  security_mirror=$(apt_uris | grep security | head -1 || true)
  if [ -z "${MIRROR:-}" ] && [ -n "$main_mirror" ]; then export MIRROR=$main_mirror; fi
  if [ -z "${SECURITY_MIRROR:-}" ] && [ -n "$security_mirror" ]; then export SECURITY_MIRROR=$security_mirror; fi
  # Another apt run (a parallel install) holds the dpkg lock: wait for it rather than fail.
  { [ -f /etc/apt/apt.conf ] && echo '#include "/etc/apt/apt.conf";'; echo 'DPkg::Lock::Timeout "600";'; } > "$WORK/apt.conf"
  echo "no registry answers: base images from ${tool#"$ROOT/"} (kept between runs; FORCE_BASE=1 rebuilds them)"
  APT_CONFIG="$WORK/apt.conf" bash "$tool" > "$WORK/base-images.log" 2>&1 \
    || { tail -30 "$WORK/base-images.log" | indent; die "base images" "local-base-images.sh failed"; }
  grep -E '^    ok: (debian|rust|started|a dockerd)' "$WORK/base-images.log" | sed 's/^    ok: /    /'
  pick_docker
fi
if [ -z "$DOCKER" ] || ! docker info >/dev/null 2>&1; then die "base images" "no docker daemon answers"; fi
t_base=$((SECONDS - t_start))
echo "time: base images ${t_base} s"

# --------------------------------------------------------------------------------------------
phase "build"
t_build_start=$SECONDS
revision=$(git rev-parse HEAD 2>/dev/null || echo unknown)
version=$(awk -F'"' '/^version *=/ { print $2; exit }' Cargo.toml)
license=$(awk -F'"' '/^license *=/ { print $2; exit }' Cargo.toml)
# The source label: the origin remote as an https URL, credentials dropped; "unknown" without one.
source_url=$(git remote get-url origin 2>/dev/null \
  | sed -E -e 's#^git@([^:]+):#https://\1/#' -e 's#^(https?://)[^/@]*@#\1#' -e 's#\.git$##' || true)
case "$source_url" in https://*) ;; *) source_url=unknown ;; esac

if [ "$registry" = yes ]; then
  export DOCKER_BUILDKIT=1
  echo "builder: BuildKit with the Dockerfile as committed (its # syntax= line fetches the frontend from the registry)"
else
  export DOCKER_BUILDKIT=0
  echo "builder: legacy (no registry: the Dockerfile's '# syntax=docker/dockerfile:1' line is ignored as a comment; Fly's BuildKit honours it)"
fi
old_image=$(docker image inspect -f '{{.Id}}' "$IMAGE" 2>/dev/null || true)
old_builder=$(docker image inspect -f '{{.Id}}' "$BUILDER_IMAGE" 2>/dev/null || true)
if [ -n "${SMOKE_COLD:-}" ]; then
  echo "SMOKE_COLD=1: removing $IMAGE and $BUILDER_IMAGE first (every edgegate layer is rebuilt)"
  docker rmi "$IMAGE" "$BUILDER_IMAGE" >/dev/null 2>&1 || true
  old_image='' old_builder=''
fi
build() {
  local log=$1; shift
  # Step lines only (legacy builder, BuildKit), so a long build shows progress; the whole log
  # is kept and its end printed when the build fails.
  if ! docker build --network=host "$@" . 2>&1 | tee "$log" \
       | { grep --line-buffered -E '^(Step [0-9]+/|#[0-9]+ \[)' || true; } | indent; then
    tail -40 "$log" | indent
    die "build" "docker build $* failed"
  fi
}
if [ -n "${SMOKE_NO_BUILD:-}" ]; then
  echo "SMOKE_NO_BUILD=1: smoke-testing $IMAGE as it is"
else
  # Each stage tagged, so that the previous run's stages can be removed by id (nothing else's).
  echo "builder stage -> $BUILDER_IMAGE (keeps the dependency layer)"
  build "$WORK/build-builder.log" --target builder -t "$BUILDER_IMAGE"
  echo "runtime image -> $IMAGE (revision $revision, version $version)"
  build "$WORK/build.log" -t "$IMAGE" \
    --build-arg "REVISION=$revision" --build-arg "VERSION=$version" --build-arg "SOURCE=$source_url"
  # The images these replaced: their own layers go, the layers still shared (the dependencies) stay.
  new_image=$(docker image inspect -f '{{.Id}}' "$IMAGE")
  new_builder=$(docker image inspect -f '{{.Id}}' "$BUILDER_IMAGE")
  drop_replaced() { if [ -n "$1" ] && [ "$1" != "$2" ]; then docker rmi "$1" >/dev/null 2>&1 || true; fi; }
  drop_replaced "$old_image" "$new_image"
  drop_replaced "$old_builder" "$new_builder"
fi
t_build=$((SECONDS - t_build_start))
echo "time: build ${t_build} s"
if [ -n "${SMOKE_BUILD_ONLY:-}" ]; then
  echo "SMOKE_BUILD_ONLY=1: $IMAGE built; smoke-test it with SMOKE_NO_BUILD=1"
  exit 0
fi

# --------------------------------------------------------------------------------------------
phase "smoke"
t_smoke_start=$SECONDS
label=(--label "edgegate-smoke=$RUN_ID")
# Every container: host networking only, removed by the trap if still there.
run() { timeout 120 "$DOCKER" run --rm --network=host "${label[@]}" "$@"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
json_get() { python3 -c 'import json, sys; v = json.load(sys.stdin); print(eval(sys.argv[1], {"v": v}))' "$1"; }

# -- the committed Dockerfile is the one Fly's BuildKit builds: its frontend line stays first.
check="Dockerfile: '# syntax=docker/dockerfile:1' kept first for Fly"
if [ "$(head -1 Dockerfile)" = "# syntax=docker/dockerfile:1" ]; then ok "$check"
else fail "$check" "line 1 is '$(head -1 Dockerfile)'"; fi

# -- context: what `docker build .` sends, listed by copying it into a scratch image.
check="build context"
ctx_image=$(printf 'FROM scratch\nCOPY . /context/\n' | DOCKER_BUILDKIT=0 docker build -q --network=host -f - . 2>"$WORK/ctx.err") \
  || { fail "$check" "probe build failed: $(tail -1 "$WORK/ctx.err")"; ctx_image=; }
if [ -n "$ctx_image" ]; then
  ctx_cid=$(docker create "${label[@]}" "$ctx_image" /none 2>/dev/null)
  docker export "$ctx_cid" | tar -tvf - > "$WORK/context.txt"
  docker rm "$ctx_cid" >/dev/null; docker rmi "$ctx_image" >/dev/null
  ctx_bytes=$(awk '{ s += $3 } END { print s + 0 }' "$WORK/context.txt")
  ctx_files=$(grep -c '^-' "$WORK/context.txt" || true)
  # What must never be sent: build output, VCS, the fuzz workspace, npm trees, local databases, secrets.
  leaked=$(awk '{ print $6 }' "$WORK/context.txt" \
    | grep -E '^context/(target|\.git|fuzz)(/|$)|/(node_modules|target)(/|$)|\.(db|db-wal|db-shm|sqlite3?)$|/\.env(\..*)?$|\.(pem|key|jwk|jwk\.json)$|/(key\.txt|signing_keys\.json)$' \
    | sed -E 's#^context/##; s#^([^/]+/[^/]+).*#\1#' | sort -u | head -5 | tr '\n' ' ' || true)
  ctx_mb=$(awk -v b="$ctx_bytes" 'BEGIN { printf "%.1f", b / 1e6 }')
  if [ -n "$leaked" ]; then
    fail "$check" "sends what .dockerignore must keep out: $leaked"
  elif [ "$ctx_bytes" -gt $((CONTEXT_BUDGET_MB * 1000000)) ]; then
    fail "$check" "$ctx_mb MB in $ctx_files files, over the $CONTEXT_BUDGET_MB MB budget"
  else
    ok "$check: $ctx_mb MB in $ctx_files files (budget $CONTEXT_BUDGET_MB MB), no target/, .git, fuzz/, node_modules, databases or keys"
  fi
fi

# -- image: size, labels, user, entrypoint and command.
check="image size"
size=$(docker image inspect -f '{{.Size}}' "$IMAGE")
size_mb=$(awk -v b="$size" 'BEGIN { printf "%.1f", b / 1e6 }')
if [ "$size" -le $((IMAGE_BUDGET_MB * 1000000)) ]; then ok "$check: $size_mb MB (budget $IMAGE_BUDGET_MB MB)"
else fail "$check" "$size_mb MB, over the $IMAGE_BUDGET_MB MB budget"; fi

check="OCI labels"
docker image inspect -f '{{json .Config.Labels}}' "$IMAGE" > "$WORK/labels.json"
binary_version=$(run "$IMAGE" --version 2>&1 | awk '{ print $NF }' || true)
why=
for pair in "source=$source_url" "revision=$revision" "version=$version" "licenses=$license"; do
  want=${pair#*=}
  got=$(json_get "(v or {}).get('org.opencontainers.image.${pair%%=*}', '<missing>')" < "$WORK/labels.json")
  [ "$got" = "$want" ] || why="$why org.opencontainers.image.${pair%%=*} is '$got', want '$want';"
done
[ "$binary_version" = "$version" ] || why="$why edgegate --version says '$binary_version', Cargo.toml '$version';"
if [ -z "$why" ]; then ok "$check: revision $revision, version $version (= edgegate --version), licenses $license, source $source_url"
else fail "$check" "${why%;}"; fi

check="user: non-root 10001"
user=$(docker image inspect -f '{{.Config.User}}' "$IMAGE")
uid=$(run --entrypoint id "$IMAGE" -u 2>&1 || true)
if [ "$user" = "10001:10001" ] && [ "$uid" = 10001 ]; then ok "$check (USER $user, id -u $uid)"
else fail "$check" "USER is '$user', id -u in the container is '$uid'"; fi

check="entrypoint and command"
entrypoint=$(docker image inspect -f '{{json .Config.Entrypoint}}' "$IMAGE")
cmd=$(docker image inspect -f '{{json .Config.Cmd}}' "$IMAGE")
# Fly's release_command "migrate" replaces CMD and keeps ENTRYPOINT.
if [ "$entrypoint" = '["edgegate"]' ] && [ "$cmd" = '["serve"]' ]; then ok "$check: $entrypoint $cmd"
else fail "$check" "ENTRYPOINT $entrypoint CMD $cmd, want [\"edgegate\"] [\"serve\"]"; fi

# -- the allocator as .cargo/config.toml builds it: arenas committed as used (mimalloc prints
# its options when MIMALLOC_VERBOSE is set; this needs the file in the image's build).
check="allocator: arenas committed lazily"
eager=$(run -e MIMALLOC_VERBOSE=1 "$IMAGE" openapi 2>&1 >/dev/null \
  | sed -n "s/^option 'arena_eager_commit': *\([0-9-]*\).*/\1/p") || true
if [ "$eager" = 0 ]; then ok "$check (mimalloc option arena_eager_commit: 0)"
else fail "$check" "mimalloc option arena_eager_commit is '$eager', want 0"; fi

# -- secrets with recognisable fake values; none may ever be printed. The integrations point at
# a closed loopback port, so nothing leaves the machine.
MARK=DONOTLEAK
secrets=(
  "SUPABASE_JWT_SECRET=smoke-jwt-secret-$MARK-0123456789abcdef0123456789"
  "STRIPE_SECRET_KEY=sk_test_smoke${MARK}0123456789"
  "STRIPE_WEBHOOK_SECRET=whsec_smoke${MARK}0123456789"
  "SUPABASE_SECRET_KEYS={\"ci\":\"sb_secret_smoke${MARK}0123456789\"}"
  "TWILIO_AUTH_TOKEN=smoke${MARK}twilio0123456789ab"
)
secret_env=()
for s in "${secrets[@]}"; do secret_env+=(-e "$s"); done
PUBLISHABLE=sb_publishable_smoke0123456789
SECRET_API_KEY="sb_secret_smoke${MARK}0123456789"
PG_PASSWORD="smoke${MARK}pg"
integration_env=(
  -e "SUPABASE_PUBLISHABLE_KEYS={\"ci\":\"$PUBLISHABLE\"}"
  -e STRIPE_API_BASE=http://127.0.0.1:9/ -e STRIPE_RECONCILE_INTERVAL_SECONDS=0
  -e TWILIO_ACCOUNT_SID=AC0123456789abcdef0123456789abcdef -e TWILIO_FROM_NUMBER=+15005550006
  -e TWILIO_API_BASE=http://127.0.0.1:9
)
: > "$WORK/printed.txt"   # everything the containers print, searched for secrets at the end

# -- migrate (Fly's release_command) against SQLite in /data, twice.
docker volume create "${label[@]}" "$RUN_ID-data" >/dev/null
# Runs `migrate` twice with the given `docker run` options (the second must be a no-op that
# succeeds); sets `why` on failure and `out` to the last output.
migrate_twice() {
  why=
  for i in 1 2; do
    if out=$(run "$@" "$IMAGE" migrate 2>&1); then echo "$out" >> "$WORK/printed.txt"
    else why="run $i exited non-zero: $(echo "$out" | tail -1)"; return; fi
  done
}
check="migrate: SQLite in /data, twice"
migrate_twice -v "$RUN_ID-data:/data"
db_file=$(run -v "$RUN_ID-data:/data" --entrypoint stat "$IMAGE" -c '%u %n' /data/edgegate.db 2>&1 || true)
if [ -z "$why" ] && [ "$db_file" = "10001 /data/edgegate.db" ]; then ok "$check ($(echo "$out" | tail -1); owner $db_file)"
else fail "$check" "${why:-/data/edgegate.db: $db_file}"; fi

# -- migrate against the machine's PostgreSQL (host networking), a fresh database, twice.
check="migrate: PostgreSQL at 127.0.0.1:5432, twice"
pg_url=
if pg_isready -q -h 127.0.0.1 -p 5432 -t 3 >/dev/null 2>&1 \
   && psql "$SMOKE_PG/postgres" -v ON_ERROR_STOP=1 -qc "create database $PG_DB" >/dev/null 2>"$WORK/pg.err"; then
  pg_made=1
  # The password is checked by nobody (trust) but must never be printed.
  pg_url="postgres://postgres:$PG_PASSWORD@127.0.0.1:5432/$PG_DB"
  migrate_twice -e "DATABASE_URL=$pg_url"
  applied=$(psql "$SMOKE_PG/$PG_DB" -tAc 'select count(*) from _sqlx_migrations where success' 2>&1 || true)
  expected=$(find migrations/postgres -name '*.sql' | wc -l)
  if [ -z "$why" ] && [ "$applied" = "$expected" ]; then ok "$check ($(echo "$out" | tail -1); $applied recorded in $PG_DB)"
  else fail "$check" "${why:-$applied migrations recorded, $expected in migrations/postgres}"; fi
elif [ "${CI:-}" = true ]; then
  fail "$check" "PostgreSQL not reachable at 127.0.0.1:5432 or no database made ($(tail -1 "$WORK/pg.err" 2>/dev/null))"
else
  echo "SKIPPED: $check: PostgreSQL not reachable at 127.0.0.1:5432 (fails under CI=true)"
fi

# -- check: the configuration and every configured dependency.
check="check (SQLite, no integrations): exit 0"
if out=$(run -v "$RUN_ID-data:/data" "$IMAGE" check 2>&1); then ok "$check"; echo "$out" | indent
else fail "$check" "exit $?: $(echo "$out" | grep -v '^ok' | head -3 | tr '\n' ' ')"; fi
# The same with every secret set: the integrations fail (closed port) but nothing secret is printed.
run "${secret_env[@]}" "${integration_env[@]}" -e "DATABASE_URL=${pg_url:-sqlite:///data/edgegate.db}" \
  -v "$RUN_ID-data:/data" "$IMAGE" check >> "$WORK/printed.txt" 2>&1 || true

# -- a malformed variable: exit 2 and one line naming it, never its value.
check="malformed variable: exit 2, one line"
# HOST too: were the value ever accepted, the container must still listen on loopback only.
set +e; out=$(run -e HOST=127.0.0.1 -e PORT=smoke-port-value "$IMAGE" 2>&1); rc=$?; set -e
lines=$(printf '%s\n' "$out" | grep -c . || true)
if [ "$rc" = 2 ] && [ "$lines" = 1 ] && [[ "$out" == *PORT* ]] && [[ "$out" != *smoke-port-value* ]]; then ok "$check: $out"
else fail "$check" "exit $rc, $lines lines: $(printf '%s' "$out" | head -3 | tr '\n' ' ')"; fi

# -- serve, as Fly runs it: the production-like container (PostgreSQL when there is one).
wait_http() {   # URL, seconds: 0 once it answers 200
  for _ in $(seq 1 $(($2 * 5))); do
    [ "$(curl -s -o /dev/null -m 2 -w '%{http_code}' "$1")" = 200 ] && return 0
    sleep 0.2
  done
  return 1
}
port=$(free_port)
base="http://127.0.0.1:$port"
serve=$(timeout 60 "$DOCKER" run -d --network=host "${label[@]}" --name "$RUN_ID-serve" \
  -e HOST=127.0.0.1 -e "PORT=$port" -e "SHUTDOWN_DRAIN_SECONDS=$DRAIN" \
  -e "DATABASE_URL=${pg_url:-sqlite:///data/edgegate.db}" -v "$RUN_ID-data:/data" \
  "${secret_env[@]}" "${integration_env[@]}" \
  -e "RUST_LOG=info,tower_http::trace::on_request=debug" \
  --health-interval=1s --health-timeout=5s --health-start-period=30s --health-retries=3 \
  "$IMAGE")
if wait_http "$base/healthz" 30; then
  ok "serve: GET /healthz 200 (listening on 127.0.0.1:$port only, host network)"
  code=$(curl -s -o "$WORK/readyz" -m 5 -w '%{http_code}' "$base/readyz")
  if [ "$code" = 200 ]; then ok "serve: GET /readyz 200"; else fail "serve: GET /readyz 200" "got $code: $(head -c 300 "$WORK/readyz")"; fi

  check="serve: GET /metrics 200, Prometheus text"
  code=$(curl -s -o "$WORK/metrics" -D "$WORK/metrics.h" -m 5 -w '%{http_code}' "$base/metrics")
  ctype=$(grep -i '^content-type:' "$WORK/metrics.h" | tr -d '\r' | cut -d' ' -f2- || true)
  families=$(grep -c '^# TYPE ' "$WORK/metrics" || true)
  if [ "$code" = 200 ] && [[ "$ctype" == text/plain* || "$ctype" == application/openmetrics-text* ]] && [ "$families" -gt 0 ]; then
    ok "$check ($families metric families, $ctype)"
  else fail "$check" "got $code, content-type '$ctype', $families '# TYPE' lines"; fi

  check="serve: jwt-test without a credential: 401 JSON"
  code=$(curl -s -o "$WORK/401" -D "$WORK/401.h" -m 5 -w '%{http_code}' "$base/functions/v1/jwt-test")
  body_code=$(json_get "v.get('code')" < "$WORK/401" 2>/dev/null || echo "<not JSON>")
  if [ "$code" = 401 ] && [ "$body_code" = UNAUTHORIZED_NO_AUTH_HEADER ] \
     && grep -qi '^sb-error-code: UNAUTHORIZED_NO_AUTH_HEADER' "$WORK/401.h" \
     && grep -qi '^www-authenticate: Bearer error="invalid_token"' "$WORK/401.h"; then
    ok "$check ($body_code, sb-error-code, WWW-Authenticate)"
  else fail "$check" "got $code, code $body_code, headers: $(grep -iE '^(sb-error-code|www-authenticate)' "$WORK/401.h" | tr -d '\r' | tr '\n' ' ')"; fi

  # Requests carrying the secret API key: it must not be logged either.
  check="serve: jwt-test with the secret API key: 200 service_role"
  role=$(curl -s -m 5 -H "apikey: $SECRET_API_KEY" "$base/functions/v1/jwt-test" | json_get "v.get('role')" 2>/dev/null || true)
  if [ "$role" = service_role ]; then ok "$check"; else fail "$check" "role '$role'"; fi

  check="HEALTHCHECK: docker reports healthy"
  health=
  for _ in $(seq 1 60); do
    health=$(docker inspect -f '{{.State.Health.Status}}' "$serve")
    [ "$health" = healthy ] && break
    sleep 0.5
  done
  if [ "$health" = healthy ]; then ok "$check (edgegate healthcheck, interval shortened to 1 s)"
  else fail "$check" "status '$health': $(docker inspect -f '{{json .State.Health.Log}}' "$serve" | head -c 400)"; fi

  # -- SIGTERM with a request in flight: its body is still arriving when the signal lands.
  check="SIGTERM with a request in flight: 200, exit 0 within SHUTDOWN_DRAIN_SECONDS=$DRAIN"
  cat > "$WORK/slow.py" <<'EOF'
import os, socket, sys, time
port, key, started, go = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
s = socket.create_connection(("127.0.0.1", port), timeout=60)
s.sendall(("POST /functions/v1/jwt-test HTTP/1.1\r\nhost: 127.0.0.1\r\n"
           "content-type: application/json\r\ncontent-length: 2\r\nconnection: close\r\n"
           "x-request-id: smoke-in-flight\r\napikey: %s\r\n\r\n{" % key).encode())
open(started, "w").close()
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.05)
s.sendall(b"}")
response = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    response += chunk
sys.stdout.write(response.decode(errors="replace"))
EOF
  python3 "$WORK/slow.py" "$port" "$PUBLISHABLE" "$WORK/started" "$WORK/go" > "$WORK/slow.out" 2>&1 &
  py_pid=$!
  for _ in $(seq 1 100); do [ -e "$WORK/started" ] && break; sleep 0.1; done
  # The signal must land once the server has taken the request (its head parsed, the handler
  # waiting for the rest of the body): before that, the connection is idle or not yet accepted,
  # and a drain closes it. A fixed pause assumed it; the server says so instead, in the line it
  # writes as it starts the request (RUST_LOG above), with this request's id. Bounded: 20 s.
  # (The logs go to a file first: under pipefail, `docker logs | grep -q` can fail when grep
  # stops reading early.)
  in_flight=no
  for _ in $(seq 1 200); do
    docker logs "$serve" > "$WORK/serve.now" 2>&1 || true
    if grep -qE '"message":"started processing request".*"request_id":"smoke-in-flight"' "$WORK/serve.now"; then
      in_flight=yes; break
    fi
    sleep 0.1
  done
  t_term=$SECONDS
  docker kill -s TERM "$serve" >/dev/null
  # The body is still outstanding while the server drains: wait (bounded: 20 s) for the server
  # to say it has stopped accepting (the line comes once its listener is closed) rather than a
  # fixed pause, then check that a new connection is refused and the container still runs.
  draining=no
  for _ in $(seq 1 200); do
    docker logs "$serve" > "$WORK/serve.now" 2>&1 || true
    if grep -qF '"shutting down: no new connections, draining"' "$WORK/serve.now"; then
      draining=yes; break
    fi
    sleep 0.1
  done
  refused=yes; curl -s -o /dev/null -m 2 "$base/healthz" && refused=no
  running=$(docker inspect -f '{{.State.Running}}' "$serve")
  : > "$WORK/go"
  timeout 30 tail --pid="$py_pid" -f /dev/null || true
  py_pid=
  status=$(head -1 "$WORK/slow.out" | tr -d '\r')
  exit_code=$(timeout $((DRAIN + 10)) "$DOCKER" wait "$serve" || echo "did not exit")
  took=$((SECONDS - t_term))
  if [[ "$status" == "HTTP/1.1 200"* ]] && grep -q '"valid":true' "$WORK/slow.out" && [ "$running" = true ] \
     && [ "$in_flight" = yes ] && [ "$draining" = yes ] && [ "$refused" = yes ] && [ "$exit_code" = 0 ] && [ "$took" -le "$DRAIN" ]; then
    ok "$check (request answered '$status' after the signal; new connections refused while draining; exit 0 after ${took} s)"
  else
    fail "$check" "in-flight answer '${status:-none}', request started before the signal: $in_flight, drain logged: $draining, running during drain: $running, new connections refused: $refused, exit code $exit_code after ${took} s"
  fi
else
  fail "serve: GET /healthz 200" "no answer on $base/healthz within 30 s: $(docker logs --tail 5 "$serve" 2>&1 | tr '\n' ' ')"
fi
docker stop -t 30 "$serve" >/dev/null 2>&1 || true

check="logs are JSON lines"
docker logs "$serve" > "$WORK/serve.log" 2>&1 || true
bad=$(python3 -c '
import json, sys
bad = 0
for line in open(sys.argv[1], errors="replace"):
    try:
        bad += not isinstance(json.loads(line), dict)
    except ValueError:
        bad += 1
print(bad)' "$WORK/serve.log")
lines=$(grep -c . "$WORK/serve.log" || true)
if [ "$lines" -gt 0 ] && [ "$bad" = 0 ]; then ok "$check ($lines lines)"
else fail "$check" "$bad of $lines lines are not JSON objects: $(head -c 200 "$WORK/serve.log")"; fi
cat "$WORK/serve.log" >> "$WORK/printed.txt"
docker inspect -f '{{json .State.Health}}' "$serve" >> "$WORK/printed.txt" 2>&1 || true

# -- --read-only root filesystem, only /data writable (a fresh volume: the database is made there).
check="read-only root filesystem, only /data writable: still serving"
docker volume create "${label[@]}" "$RUN_ID-ro" >/dev/null
port=$(free_port)
ro=$(timeout 60 "$DOCKER" run -d --read-only --network=host "${label[@]}" --name "$RUN_ID-ro" \
  -e HOST=127.0.0.1 -e "PORT=$port" -v "$RUN_ID-ro:/data" "${secret_env[@]}" "${integration_env[@]}" "$IMAGE")
if wait_http "http://127.0.0.1:$port/readyz" 30; then
  db=$(docker exec "$ro" stat -c '%n' /data/edgegate.db 2>&1 || true)
  if docker exec "$ro" sh -c ': > /usr/local/bin/probe' 2>/dev/null; then
    fail "$check" "the root filesystem is writable"
  elif [ "$db" != /data/edgegate.db ]; then
    fail "$check" "no database in /data: $db"
  else ok "$check (GET /readyz 200, /data/edgegate.db created, / not writable)"; fi
else
  fail "$check" "GET /readyz never answered 200: $(docker logs --tail 5 "$ro" 2>&1 | tr '\n' ' ')"
fi
check="docker stop: exit 0"
docker stop -t 30 "$ro" >/dev/null
code=$(docker inspect -f '{{.State.ExitCode}}' "$ro")
if [ "$code" = 0 ]; then ok "$check"; else fail "$check" "exit code $code"; fi
docker logs "$ro" >> "$WORK/printed.txt" 2>&1 || true

# -- no secret anywhere a container printed: docker logs, health probe logs, command output.
check="no secret in docker logs, health logs or command output"
names=()
for s in "${secrets[@]}" "DATABASE_URL password=$PG_PASSWORD"; do
  value=${s#*=}; value=${value#*\"ci\":\"}; value=${value%\"\}}
  grep -qF "$value" "$WORK/printed.txt" && names+=("${s%%=*}")
done
if grep -q "$MARK" "$WORK/printed.txt" && [ ${#names[@]} = 0 ]; then names+=("a value marked $MARK"); fi
if [ ${#names[@]} = 0 ]; then ok "$check ($(grep -c . "$WORK/printed.txt") lines searched)"
else fail "$check" "printed: ${names[*]}"; fi

t_smoke=$((SECONDS - t_smoke_start))
echo "time: smoke ${t_smoke} s"

# --------------------------------------------------------------------------------------------
phase "summary"
echo "time: base images ${t_base} s, build ${t_build} s, smoke ${t_smoke} s, total $((SECONDS - t_start)) s"
echo "image: $IMAGE ${size_mb} MB, revision $revision"
pidfile=${XDG_CACHE_HOME:-$HOME/.cache}/edgegate-images/dockerd.pid
echo "dockerd left running: no bridge, no iptables, unix socket only$([ -f "$pidfile" ] && echo " (stop it: kill \$(cat $pidfile))")"
if [ "$failures" -gt 0 ]; then
  echo "$failures of $checks checks FAILED"
  exit 1
fi
echo "all $checks checks passed"
