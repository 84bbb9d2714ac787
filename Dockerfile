# Build stage: the Rust toolchain image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY src ./src
# A static musl binary: no dynamic loader and no glibc start-up (which, in a VM that traps
# CPUID, costs ~0.5 ms per process); see README "Benchmark". It is static-pie, Rust's
# default for the target: its addresses are randomised, as it runs with NET_ADMIN.
RUN rustup target add x86_64-unknown-linux-musl \
    && cargo build --release --locked --target x86_64-unknown-linux-musl

# Runtime: iptables (legacy and nft), nftables (bookworm: 1.0.6) for --native-nftables. No
# iproute2: the TPROXY routes and ::6 are changed over rtnetlink in process, and emptied
# iptables-nft tables are dropped over netlink.
FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/x86_64-unknown-linux-musl/release/istio-iptables /usr/local/bin/istio-iptables
ENTRYPOINT ["/usr/local/bin/istio-iptables"]
