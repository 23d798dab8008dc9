# wsgate: multi-stage build, small runtime image, non-root user, health check on /readyz.
#   docker build -t wsgate .
#   docker run -p 8080:8080 -e WSGATE_JWT_SECRET=... --ulimit nofile=1048576:1048576 wsgate
# (deploy/compose/ runs a 3-node cluster with Redis behind nginx.)

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Dependencies first, so source edits do not rebuild them: a manifest-only build of stubs.
COPY Cargo.toml Cargo.lock ./
COPY loadtest/Cargo.toml loadtest/Cargo.toml
RUN mkdir -p src benches loadtest/src \
    && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
    && echo 'fn main() {}' > loadtest/src/main.rs \
    && for b in frame protocol fanout wheel auth; do echo 'fn main() {}' > "benches/$b.rs"; done \
    && cargo build --release --locked --bin wsgate \
    && rm -rf src benches loadtest/src
COPY . .
RUN touch src/main.rs src/lib.rs && cargo build --release --locked --bin wsgate

FROM debian:bookworm-slim
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin wsgate
COPY --from=build /src/target/release/wsgate /usr/local/bin/wsgate
USER 10001:10001
# Every address of the container; dev mode (no key) refuses that: set WSGATE_JWT_SECRET or
# WSGATE_JWT_PUBLIC_KEY_FILE. Logs as JSON lines for collectors.
ENV WSGATE_LISTEN=0.0.0.0:8080 \
    WSGATE_LOG_FORMAT=json
EXPOSE 8080
# SIGTERM starts a graceful drain (connections get 1001, up to drain_timeout = 10 s).
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["/usr/local/bin/wsgate", "probe"]
ENTRYPOINT ["/usr/local/bin/wsgate"]
