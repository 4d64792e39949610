# syntax=docker/dockerfile:1
#
# Container image of embed-url-operator.
#
#   docker build -t embed-url-operator:dev .
#
# The image is for the architecture of the machine that builds it. For clusters
# with both amd64 and arm64 (Graviton) nodes, build and push both at once:
#
#   docker buildx build --platform linux/amd64,linux/arm64 -t REGISTRY/embed-url-operator:TAG --push .
#
# Then push it to a registry your cluster can pull from and point the Helm
# chart's image.repository / image.tag at it.

# ---- build ------------------------------------------------------------------
FROM rust:1-bookworm AS builder
# One build cache per platform, each used by one build at a time: a multi-platform
# build runs the platforms' builds at once, and a shared target/ would mix their
# artifacts (and the binary copied out of it).
ARG TARGETPLATFORM
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry,id=embed-url-operator-registry-$TARGETPLATFORM,sharing=locked \
    --mount=type=cache,target=/src/target,id=embed-url-operator-target-$TARGETPLATFORM,sharing=locked \
    cargo build --release --locked --bin embed-url-operator \
    && cp target/release/embed-url-operator /embed-url-operator

# ---- runtime ----------------------------------------------------------------
# distroless/cc: glibc, libgcc and CA certificates, no shell; the :nonroot
# variant runs as UID/GID 65532, which the Helm chart also enforces.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=builder /embed-url-operator /usr/local/bin/embed-url-operator
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/embed-url-operator", "run"]
