# syntax=docker/dockerfile:1

# edgegate container image: the dependencies compiled in a layer of their own,
# a slim Debian runtime. Build: `docker build -t edgegate .` (Fly builds it
# remotely).
#
# The builder is Debian 12 (bookworm) like the runtime, so the binary's glibc
# (2.36) matches. rust-version in Cargo.toml is 1.94; the image pins 1.95.
# aws-lc-sys (crypto for rustls and jsonwebtoken) compiles AWS-LC from C
# sources: the gcc in rust:*-bookworm is enough, no cmake or bindgen needed.

FROM rust:1.95-bookworm AS builder
WORKDIR /app
# Queries are plain runtime sqlx::query calls; never reach for a database at
# build time. migrations/ is embedded by sqlx::migrate! when the crate builds.
ENV SQLX_OFFLINE=true
# The build's settings (mimalloc's compile-time defaults) before the dependencies are compiled,
# so that the last step does not compile them again.
COPY .cargo .cargo
# Profile-guided optimization: the dependencies and edgegate are compiled with the counts an
# instrumented build recorded under load (bench/pgo.sh, which made this file; BENCHMARKS.md,
# twenty-fourth pass): 13-15 % less CPU a request on the HTTP path. A function changed since
# the profile was made is compiled as without one.
COPY pgo/edgegate.profdata.gz /pgo/
RUN gunzip /pgo/edgegate.profdata.gz
ENV RUSTFLAGS="-Cprofile-use=/pgo/edgegate.profdata"
# The dependencies alone, from the manifests and stand-ins for edgegate's own sources (the
# targets Cargo.toml names), so that this layer is rebuilt only when the dependencies, the
# settings or the profile change, not on every source edit. What cargo-chef did, without first
# compiling cargo-chef (90 s of a cold build on 2 cores). edgegate's stand-in artifacts are
# removed, so the next step compiles the real sources whatever their timestamps.
COPY Cargo.toml Cargo.lock ./
RUN mkdir -p src benches \
    && echo 'fn main() {}' > src/main.rs \
    && touch src/lib.rs \
    && echo 'fn main() {}' > benches/verify.rs \
    && cargo build --release --locked --bin edgegate \
    && rm -rf src benches target/release/edgegate target/release/edgegate.d \
        target/release/deps/edgegate-* target/release/deps/libedgegate-* \
        target/release/.fingerprint/edgegate-*
COPY . .
RUN cargo build --release --locked --bin edgegate

FROM debian:bookworm-slim AS runtime
# ca-certificates: reqwest's rustls-platform-verifier trusts the system roots.
# SQLite is bundled into the binary, so nothing else is needed.
# The CA bundle is deliberately left unpinned: it should track Debian's
# bookworm security updates, and a pinned version disappears from the archive
# once superseded, which would break every later build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 edgegate \
    && useradd --system --uid 10001 --gid edgegate --home-dir /data \
        --no-create-home --shell /usr/sbin/nologin edgegate \
    && mkdir /data \
    && chown edgegate:edgegate /data

COPY --from=builder /app/target/release/edgegate /usr/local/bin/edgegate

# The default DATABASE_URL (sqlite://edgegate.db) is relative to the working
# directory, which the non-root user must be able to write. Production sets a
# Postgres DATABASE_URL instead (a Fly secret).
WORKDIR /data
USER 10001:10001

ENV LOG_FORMAT=json \
    PORT=8080 \
    HOST=0.0.0.0
EXPOSE 8080

# edgegate drains in-flight requests for 25 s on SIGTERM, then takes up to 4 s
# more; give the runtime 30 s (fly.toml's kill_timeout; docker run
# --stop-timeout 30, as docker stop waits only 10 s by default).
STOPSIGNAL SIGTERM
# No curl in the image: the binary probes its own /healthz.
HEALTHCHECK --interval=30s --timeout=5s --start-period=15s --retries=3 \
    CMD ["edgegate", "healthcheck"]

ENTRYPOINT ["edgegate"]
CMD ["serve"]

# OCI labels, last so that a new revision reuses every layer above. The values
# come from build arguments (tests/image/smoke.sh passes them; on Fly:
# `fly deploy --build-arg REVISION=$(git rev-parse HEAD) --build-arg VERSION=…`).
ARG SOURCE=unknown
ARG REVISION=unknown
ARG VERSION=unknown
LABEL org.opencontainers.image.title="edgegate" \
      org.opencontainers.image.description="Supabase Edge Functions behind one credential layer for legacy and signing-key JWTs" \
      org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
