#!/bin/sh
# Collects the image's whole root filesystem into DEST (which must not exist): the static
# BINARY, the iptables programs the backends run (xtables-nft-multi and xtables-legacy-multi
# under the eight names detect.rs calls), nft, exactly the shared libraries and xtables
# extensions those load, /etc/passwd and /etc/group (root, istio-proxy 1337), and the empty
# mount points /proc, /sys, /dev and /run. Nothing else: no shell, no package manager.
#
# Usage: image/rootfs.sh BINARY DEST
#
# Runs where iptables and nftables are installed from Debian bookworm: in the Dockerfile's
# Debian stage, and in tests/it/image.rs on a bookworm host (the same packages), which then
# runs the entrypoint in DEST. Needs only what debian:bookworm-slim has (sh, coreutils, ldd).
set -eu

if [ $# -ne 2 ]; then
    echo "usage: $0 BINARY DEST" >&2
    exit 2
fi
bin=$1
dest=$2
if [ -e "$dest" ]; then
    echo "$0: $dest exists: give a new directory" >&2
    exit 2
fi

# The extensions our rules load (iptables-restore to parse them, iptables-save to print
# them): the matches and targets of build.rs's rules, plus `standard` (jumps, RETURN,
# ACCEPT, DROP) and `tcp`/`udp` (-p with --dport). Under strace, TPROXY with DNS capture and
# REDIRECT with DNS capture and INVALID_DROP load exactly these 13; tests/it/image.rs applies
# the seed, TPROXY with DNS, legacy and native configs with them alone.
EXTENSIONS="standard tcp udp owner mark MARK multiport conntrack connmark CONNMARK REDIRECT TPROXY CT"

# A static binary: the image holds no loader or libc for it.
case $(ldd "$bin" 2>&1 || true) in
*"not a dynamic executable"* | *"statically linked"*) ;;
*)
    echo "$0: $bin is dynamically linked; build the static musl target" >&2
    exit 1
    ;;
esac

# The directory libxtables is in: /usr/lib/<multiarch>; its extensions are in xtables/.
libdir=$(dirname "$(readlink -f "$(ldd /usr/sbin/xtables-nft-multi | awk '$1 == "libxtables.so.12" { print $3 }')")")
extdir=$libdir/xtables
[ -d "$extdir" ] || {
    echo "$0: no xtables extensions in $extdir" >&2
    exit 1
}

mkdir -p "$dest/usr/local/bin" "$dest/usr/sbin" "$dest/usr/lib" "$dest/etc"
mkdir -m 0755 "$dest/proc" "$dest/sys" "$dest/dev" "$dest/run"
# Merged /usr: /lib and /lib64 are links into /usr, as on the Debian the files come from (the
# programs' loader is /lib64/ld-linux-x86-64.so.2 or /lib/ld-linux-aarch64.so.1).
for d in lib lib64; do
    if [ -L "/$d" ]; then
        ln -s "$(readlink "/$d")" "$dest/$d"
        mkdir -p "$dest/$(readlink -f "/$d")"
    fi
done

# Copies path $1 into DEST as it is: each symlink on the way as a symlink, then the file.
add() {
    p=$1
    while [ -L "$p" ]; do
        cp -P --parents "$p" "$dest"
        t=$(readlink "$p")
        case $t in
        /*) p=$t ;;
        *) p=$(dirname "$p")/$t ;;
        esac
    done
    cp --parents "$p" "$dest"
}

# Every shared object (and the loader) that $1 loads, as ldd resolves them.
libs_of() {
    ldd "$1" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
}

cp "$bin" "$dest/usr/local/bin/istio-iptables"
chmod 0755 "$dest/usr/local/bin/istio-iptables"

loaded=""
for prog in xtables-nft-multi xtables-legacy-multi nft; do
    cp "$(readlink -f "/usr/sbin/$prog")" "$dest/usr/sbin/$prog"
    loaded="$loaded $(libs_of "/usr/sbin/$prog")"
done
for flavor in nft legacy; do
    for base in iptables ip6tables; do
        for verb in save restore; do
            ln -s "xtables-$flavor-multi" "$dest/usr/sbin/$base-$flavor-$verb"
        done
    done
done
mkdir -p "$dest$extdir"
for e in $EXTENSIONS; do
    cp "$extdir/libxt_$e.so" "$dest$extdir/"
    loaded="$loaded $(libs_of "$extdir/libxt_$e.so")"
done
for lib in $(printf '%s\n' $loaded | sort -u); do
    add "$lib"
done

printf '%s\n' 'root:x:0:0:root:/:/nonexistent' 'istio-proxy:x:1337:1337:istio-proxy:/:/nonexistent' \
    >"$dest/etc/passwd"
printf '%s\n' 'root:x:0:' 'istio-proxy:x:1337:' >"$dest/etc/group"
chmod 0644 "$dest/etc/passwd" "$dest/etc/group"
