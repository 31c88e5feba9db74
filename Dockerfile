# syntax=docker/dockerfile:1
# credit-worker container image.
#   docker build -t credit-worker .
#   docker run --rm --stop-timeout 30 -e DATABASE_URL=... -e AMQP_URL=... -p 9464:9464 credit-worker
# (a stop may take up to 27 s: Docker's default 10 s would kill it mid-drain)

# ---- build -------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# --locked: build exactly the dependency versions in Cargo.lock. The registry and the target
# directory are BuildKit cache mounts, kept between builds: a rebuild after a change to the
# sources fetches nothing and compiles only what changed, not every dependency again. The
# binary is copied out in the same step, since a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
 && install -m 0755 target/release/credit-worker /usr/local/bin/credit-worker

# ---- runtime -----------------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates for TLS connections (amqps://, sslmode=require).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 credit \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin credit
COPY --from=build /usr/local/bin/credit-worker /usr/local/bin/credit-worker
USER 10001:10001
# Inside a container the metrics/health endpoint must listen on all interfaces.
ENV CREDIT_WORKER__HTTP__LISTEN=0.0.0.0:9464
EXPOSE 9464
# The worker exits 0 after a graceful drain on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["credit-worker"]
CMD ["run"]
