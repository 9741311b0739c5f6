#!/usr/bin/env bash
# Cross-compiles the portcullis release binary for 64-bit Raspberry Pi OS (aarch64, Debian 12
# "bookworm", glibc 2.36) on a Debian/Ubuntu x86_64 machine.
#
# Usage, from anywhere in the repository:
#   bash deploy/build-aarch64.sh
#
# What it does:
#   - adds the Rust target aarch64-unknown-linux-gnu (rustup) if it is missing;
#   - installs the cross C toolchain and the target's C library (apt: gcc-aarch64-linux-gnu,
#     libc6-dev-arm64-cross, libc6-arm64-cross) if they are missing. That needs root; as another
#     user the script prints the apt-get command and exits 1. The C compiler is needed for the
#     bundled SQLite (rusqlite) and for ring's C/assembly, and it is also the linker;
#   - runs `cargo build --release --locked --target aarch64-unknown-linux-gnu` (slow: the release
#     profile uses lto = true and codegen-units = 1);
#   - prints the binary's path and size and the highest GLIBC_x.y symbol version it needs, and
#     fails if that is newer than 2.36 (what Raspberry Pi OS bookworm ships): such a binary would
#     not start on the Pi ("version `GLIBC_2.xx' not found").
# It honours CARGO_TARGET_DIR (and build.target-dir): the binary is looked up through
# `cargo metadata`. Set CC_aarch64_unknown_linux_gnu / CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER
# beforehand to use another cross compiler.
#
# Then test it under qemu here, and copy it to the Pi and install it there:
#   bash deploy/smoke-aarch64.sh
#   scp target/aarch64-unknown-linux-gnu/release/portcullis pi@raspberrypi.local:
#   scp -r deploy config pi@raspberrypi.local:
#   ssh pi@raspberrypi.local sudo ./deploy/install.sh ./portcullis
# (docs/raspberry-pi.md, "Install", has the details.)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TARGET=aarch64-unknown-linux-gnu
CROSS=aarch64-linux-gnu
MAX_GLIBC=2.36 # Raspberry Pi OS bookworm (Debian 12)
APT_PACKAGES=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross libc6-arm64-cross)

say() { echo "build-aarch64: $*"; }
die() { echo "build-aarch64: $*" >&2; exit 1; }
is_root() { [[ ${EUID:-$(id -u)} -eq 0 ]]; }

# 1. The Rust standard library for the target (python3 reads cargo metadata below).
for tool in cargo rustc python3; do
    command -v "$tool" >/dev/null || die "$tool is required but not found (Rust 1.85 or newer: https://rustup.rs)"
done
target_libdir=$(rustc --print target-libdir --target "$TARGET")
if [[ ! -d $target_libdir ]]; then
    command -v rustup >/dev/null || die "the Rust target $TARGET is not installed and rustup is not available"
    say "adding the Rust target $TARGET"
    rustup target add "$TARGET"
fi

# 2. The cross C compiler (with binutils) and the target's C library. The compiler alone is not
#    enough: without libc6-dev-arm64-cross it finds no headers and no crt1.o.
have_toolchain() {
    command -v "$CROSS-gcc" >/dev/null &&
        [[ $("$CROSS-gcc" -print-file-name=crt1.o) == /* ]]
}
if ! have_toolchain; then
    if ! is_root; then
        echo "build-aarch64: the cross toolchain is missing; install it with:" >&2
        echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends ${APT_PACKAGES[*]}" >&2
        exit 1
    fi
    say "installing ${APT_PACKAGES[*]}"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${APT_PACKAGES[@]}"
    have_toolchain || die "$CROSS-gcc still cannot link for $TARGET after installing ${APT_PACKAGES[*]}"
fi

# 3. The compiler for the C parts (bundled SQLite, ring) and the linker.
export CC_aarch64_unknown_linux_gnu=${CC_aarch64_unknown_linux_gnu:-$CROSS-gcc}
export AR_aarch64_unknown_linux_gnu=${AR_aarch64_unknown_linux_gnu:-$CROSS-ar}
export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=${CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER:-$CROSS-gcc}

# 4. Build.
say "cargo build --release --locked --target $TARGET (lto = true, codegen-units = 1: this takes a while)"
start=$SECONDS
cargo build --release --locked --target "$TARGET"
elapsed=$((SECONDS - start))

target_dir=$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
bin="$target_dir/$TARGET/release/portcullis"
[[ -f $bin ]] || die "cargo reported success but $bin does not exist"

# 5. What the Pi needs to run it.
readelf=$CROSS-readelf
command -v "$readelf" >/dev/null || readelf=readelf
command -v "$readelf" >/dev/null || die "neither $CROSS-readelf nor readelf found (apt-get install binutils-$CROSS)"

machine=$("$readelf" -h "$bin" | sed -n 's/^ *Machine: *//p')
[[ $machine == AArch64 ]] || die "$bin is not an aarch64 executable (ELF machine: ${machine:-unknown})"

glibc=$("$readelf" --wide --version-info "$bin" | { grep -o 'GLIBC_[0-9][0-9.]*' || true; } |
    sed 's/^GLIBC_//' | sort -u -V | tail -n 1)
needed=$("$readelf" --wide --dynamic "$bin" | sed -n 's/.*(NEEDED).*\[\(.*\)\]$/\1/p' | paste -sd ' ' -)
size=$(stat -c %s "$bin")

say "built in ${elapsed}s"
say "binary:  $bin"
say "size:    $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.1f MiB", s / 1048576 }'))"
say "needs:   ${needed:-no shared libraries}"
if [[ -z $glibc ]]; then
    say "glibc:   no GLIBC_ symbol versions (statically linked?)"
else
    say "glibc:   highest symbol version GLIBC_$glibc (Raspberry Pi OS bookworm has $MAX_GLIBC)"
    if [[ $(printf '%s\n%s\n' "$glibc" "$MAX_GLIBC" | sort -V | tail -n 1) != "$MAX_GLIBC" ]]; then
        "$readelf" --wide --version-info "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' | sort -u -V |
            sed 's/^/  needs /' >&2
        die "the binary needs GLIBC_$glibc, newer than $MAX_GLIBC: it would not start on the Pi. Build on Debian 12 (bookworm), whose libc6-dev-arm64-cross is glibc 2.36."
    fi
fi
say "OK. Copy it to the Pi: scp $bin pi@raspberrypi.local:"
