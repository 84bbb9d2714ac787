# Build stage: the Rust toolchain image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
RUN cargo build --release --locked

# Runtime: iptables (legacy and nft), iproute2 for the TPROXY routes and ::6, nftables
# (bookworm: 1.0.6) for --native-nftables and to drop tables a reconcile leaves empty.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables iproute2 nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/istio-iptables /usr/local/bin/istio-iptables
ENTRYPOINT ["/usr/local/bin/istio-iptables"]
