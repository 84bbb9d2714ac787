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

# install_binary DIR: measures a copy of BIN in DIR (BIN then names the copy, BIN_SOURCE the
# original). An image installs the binary by copying it (the Dockerfile's COPY; a node then
# reads it from the image layer); the linker's own output file is never what runs. Its page
# cache is filled by the linker's small writes, and on this VM (kernel 6.18, ext4) a run
# started from it took about 0.2 ms longer than one started from a copy of the same bytes
# (bench.sh, same binary, seed fresh apply: 1.20x in two runs from target/, 1.14-1.17x in four
# from a copy).
install_binary() {
    export BIN_SOURCE=$BIN
    cp "$BIN" "$1/istio-iptables" || die "cannot copy $BIN to $1"
    chmod 0755 "$1/istio-iptables"
    BIN=$1/istio-iptables
}

# From here on both sides find their programs on Debian's default PATH, the one `sudo` sets
# (the time our binary spends looking programs up grows with PATH's length, and a
# developer's PATH can be twice as long). The image's own PATH is shorter still.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
