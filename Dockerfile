# The operator image: a static-enough Rust binary on a distroless, non-root base.
#
#   docker build -t ghcr.io/celery-operator/celery-operator:0.1.0 .
#
# Stage 1 builds the plugins (wasm32-wasip2) and the operator with the pinned toolchain.
FROM rust:1.95-bookworm AS build
RUN rustup target add wasm32-wasip2
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release -p celery-operator \
 && cp target/release/celery-operator /celery-operator

# Stage 2: only the binary, on distroless (glibc, CA certificates, no shell), as UID 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /celery-operator /usr/local/bin/celery-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/celery-operator"]
CMD ["run"]
