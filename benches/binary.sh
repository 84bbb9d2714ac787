# Sourced by the benchmark scripts: sets BIN to the binary to measure. Unless BIN is given,
# the release image's binary: the static musl build (see the Dockerfile) when that target is
# installed (rustup target add x86_64-unknown-linux-musl), else the default glibc build;
# TARGET=triple picks another target, TARGET= the glibc build. Built with cargo build
# --release unless SKIP_BUILD is set. Needs: $root (the crate), die(), $name (for messages).
if [[ -z ${BIN:-} ]]; then
    if [[ -z ${TARGET+set} ]]; then
        TARGET=
        if rustup target list --installed 2>/dev/null | grep -qx x86_64-unknown-linux-musl; then
            TARGET=x86_64-unknown-linux-musl
        else
            echo "$name: warning: the musl target is not installed: measuring the glibc build," \
                "not the image's (rustup target add x86_64-unknown-linux-musl)" >&2
        fi
    fi
    BIN=$root/target/${TARGET:+$TARGET/}release/istio-iptables
    if [[ -z ${SKIP_BUILD:-} ]]; then
        command -v cargo >/dev/null || die "cargo not found (or set BIN=/path/to/istio-iptables)"
        echo "$name: cargo build --release ${TARGET:+--target $TARGET} ..." >&2
        (cd "$root" && cargo build --release --quiet ${TARGET:+--target "$TARGET"}) \
            || die "cargo build --release failed"
    fi
fi
[[ -x $BIN ]] || die "binary not found: $BIN"
