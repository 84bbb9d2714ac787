# syntax=docker/dockerfile:1
# The istio-iptables image, for linux/amd64 and linux/arm64:
#   docker buildx build --platform linux/amd64,linux/arm64 -t example.org/istio-iptables .
#
# Why FROM scratch and not a distroless base: the image needs a handful of files from
# Debian's iptables and nftables packages (two xtables multi-binaries, nft, the 13 xtables
# extensions our rules use and the libraries they load) and nothing else. A distroless base
# brings a libc and base files, but not iptables; copying exactly what the programs load
# from a Debian stage into scratch gives a smaller image (about 9 MiB) whose every file is
# accounted for by image/rootfs.sh, and tests/it/image.rs runs that very script.

# Build stage: on the build machine's platform, cross-compiling the static musl binary for
# the image's platform (TARGETARCH), so an arm64 image needs no emulated compiler.
FROM --platform=$BUILDPLATFORM rust:1-bookworm AS build
ARG TARGETARCH
WORKDIR /src
RUN case "$TARGETARCH" in \
        amd64) arch=x86_64 ;; \
        arm64) arch=aarch64 ;; \
        *) echo "unsupported TARGETARCH: $TARGETARCH" >&2; exit 1 ;; \
    esac \
    && echo "$arch-unknown-linux-musl" > /target \
    && rustup target add "$arch-unknown-linux-musl" \
    && if [ "$(uname -m)" != "$arch" ]; then \
        apt-get update \
        && apt-get install -y --no-install-recommends "gcc-$(echo "$arch" | tr _ -)-linux-gnu" \
        && rm -rf /var/lib/apt/lists/*; \
    fi
COPY Cargo.toml Cargo.lock build.rs ./
COPY .cargo ./.cargo
COPY src ./src
# A static musl binary: no dynamic loader and no glibc start-up (which, in a VM that traps
# CPUID, costs ~0.5 ms per process); see README "Benchmark". It is static-pie, Rust's
# default for the target: its addresses are randomised, as it runs with NET_ADMIN. The
# aarch64 linker is in .cargo/config.toml; the x86_64 one is named here for an arm64 builder
# (on amd64 it is the native gcc).
RUN CARGO_TARGET_X86_64_UNKNOWN_LINUX_MUSL_LINKER=x86_64-linux-gnu-gcc \
    cargo build --release --locked --target "$(cat /target)" \
    && cp "target/$(cat /target)/release/istio-iptables" /istio-iptables

# Debian stage, on the image's platform: iptables (legacy and nft) and nftables (bookworm:
# 1.0.6, for --native-nftables), then image/rootfs.sh collects the final root filesystem in
# /rootfs. No iproute2: the TPROXY routes and ::6 are changed over rtnetlink in process.
FROM debian:bookworm-slim AS rootfs
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables nftables \
    && rm -rf /var/lib/apt/lists/*
COPY image/rootfs.sh /rootfs.sh
COPY --from=build /istio-iptables /istio-iptables
RUN sh /rootfs.sh /istio-iptables /rootfs

# The image: the files rootfs.sh collected, nothing else (no shell, no package manager).
# Istio sets the user of both init containers (istio-init: 0, istio-validation: 1337); the
# default is the proxy's user, as in Istio's proxy image.
FROM scratch
COPY --from=rootfs /rootfs/ /
ENV PATH=/usr/local/bin:/usr/sbin
USER 1337:1337
ENTRYPOINT ["/usr/local/bin/istio-iptables"]
