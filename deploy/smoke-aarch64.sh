#!/usr/bin/env bash
# Smoke-tests the aarch64 binary built by deploy/build-aarch64.sh, under qemu user-mode
# emulation, on an x86_64 machine:
#   a) `portcullis --version` prints "portcullis <the crate's version>";
#   b) `portcullis check` accepts the example config config/portcullis.toml;
#   c) a real gateway run: a stand-in upstream (python3 http.server) behind one keyed route, a key
#      made by the binary's own `keygen`; a request with the key gets the upstream's file, one
#      without gets 401; SIGTERM stops the gateway with exit status 0; the audit file holds both
#      request records (key_id "smoke" with status 200, and a 401).
#
# Usage: bash deploy/build-aarch64.sh && bash deploy/smoke-aarch64.sh
# Installs qemu-user (apt) if qemu-aarch64 is missing: as root only; otherwise it prints the
# command and exits 1. Needs python3 (stand-in upstream, free ports, audit check); uses curl if
# present, else python3, for the requests. Honours CARGO_TARGET_DIR like the build script.
# Every process it starts is stopped on exit, by PID; its temporary directory is removed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$PWD

TARGET=aarch64-unknown-linux-gnu
SYSROOT=${QEMU_LD_PREFIX:-/usr/aarch64-linux-gnu} # libc6-arm64-cross: the target's ld.so and libc
WAIT_SECS=30

say() { echo "smoke-aarch64: $*"; }
die() { echo "smoke-aarch64: FAIL: $*" >&2; exit 1; }
is_root() { [[ ${EUID:-$(id -u)} -eq 0 ]]; }

command -v python3 >/dev/null || die "python3 is required"
# The interpreter itself (not a wrapper such as a pyenv shim), so its PID is the server's.
PY=$(python3 -c 'import sys; print(sys.executable)')

if ! command -v qemu-aarch64 >/dev/null; then
    if ! is_root; then
        echo "smoke-aarch64: qemu-aarch64 is missing; install it with:" >&2
        echo "  sudo apt-get update && sudo apt-get install -y --no-install-recommends qemu-user" >&2
        exit 1
    fi
    say "installing qemu-user"
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends qemu-user
fi
[[ -e $SYSROOT/lib/ld-linux-aarch64.so.1 ]] ||
    die "no aarch64 C library in $SYSROOT (apt-get install libc6-arm64-cross, or set QEMU_LD_PREFIX)"

metadata=$(cargo metadata --format-version 1 --no-deps)
meta() { python3 -c "import json, sys; d = json.load(sys.stdin); print($1)" <<<"$metadata"; }
BIN="$(meta 'd["target_directory"]')/$TARGET/release/portcullis"
VERSION=$(meta '[p for p in d["packages"] if p["name"] == "portcullis"][0]["version"]')
[[ -x $BIN ]] || die "no binary at $BIN: run deploy/build-aarch64.sh first"
pc() { qemu-aarch64 -L "$SYSROOT" "$BIN" "$@"; }

tmp=$(mktemp -d)
gw_pid='' up_pid=''
cleanup() {
    local rc=$?
    for pid in $gw_pid $up_pid; do
        if kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            sleep 0.5
            kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    if [[ $rc -ne 0 ]]; then
        for f in gateway.log upstream.log audit.jsonl; do
            [[ -s $tmp/$f ]] || continue
            echo "---- $f (last 20 lines)" >&2
            tail -n 20 "$tmp/$f" >&2
        done
    fi
    rm -rf "$tmp"
}
trap cleanup EXIT
# The working directory of every run is the temporary one, so a developer's .env in the
# repository cannot change what is tested.
cd "$tmp"

# a) --version
out=$(pc --version)
[[ $out =~ ^portcullis\ [0-9]+\.[0-9]+\.[0-9]+(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$ ]] ||
    die "--version printed '$out', expected 'portcullis <semver>'"
[[ $out == "portcullis $VERSION" ]] || die "--version printed '$out', but Cargo.toml says $VERSION"
say "a) --version: $out"

# b) The example config. Its bridge route sends "Bearer ${OPENROUTER_API_KEY}" upstream, and
#    `check` resolves every secret the config names, so it fails unless that variable (or
#    OPENROUTER_API_KEY_FILE, or $CREDENTIALS_DIRECTORY/OPENROUTER_API_KEY) exists. A dummy value
#    stands in for the real secret; nothing is sent anywhere. Nothing else is inherited.
if ! out=$(env -i PATH="$PATH" OPENROUTER_API_KEY=dummy-for-smoke-test \
    qemu-aarch64 -L "$SYSROOT" "$BIN" check --config "$REPO/config/portcullis.toml" 2>&1); then
    echo "$out" >&2
    die "check --config config/portcullis.toml failed"
fi
say "b) check --config config/portcullis.toml:"
sed 's/^/     /' <<<"$out"

# c) A keyed request through a stand-in upstream.
read -r up_port gw_port < <("$PY" -c '
import socket
socks = [socket.socket() for _ in range(2)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
')
mkdir www
content="portcullis aarch64 smoke test $(date -u +%Y-%m-%dT%H:%M:%SZ) $RANDOM"
printf '%s\n' "$content" >www/hello.txt

"$PY" -m http.server --bind 127.0.0.1 --directory "$tmp/www" "$up_port" >upstream.log 2>&1 &
up_pid=$!

keygen=$(pc keygen --id smoke)
key=$(head -n 1 <<<"$keygen")
keys_block=$(sed -n '/^\[\[keys\]\]$/,$p' <<<"$keygen")
[[ -n $key && $key != *' '* ]] || die "keygen printed no key on its first line: $keygen"
grep -q '^hash = "sha256:[0-9a-f]\{64\}"$' <<<"$keys_block" ||
    die "keygen printed no [[keys]] block with a sha256 hash: $keygen"

cat >portcullis.toml <<EOF
[server]
listen = "127.0.0.1:$gw_port"

[audit]
output = "$tmp/audit.jsonl"

[[routes]]
name = "smoke"
path = "/"
upstream = "http://127.0.0.1:$up_port"
auth = "key"

$keys_block
EOF

# Waits until something accepts connections on 127.0.0.1:$1, while process $2 lives.
wait_port() {
    local port=$1 pid=$2 what=$3 deadline=$((SECONDS + WAIT_SECS))
    until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
        kill -0 "$pid" 2>/dev/null || die "$what exited before accepting connections"
        ((SECONDS < deadline)) || die "$what did not accept connections on port $port within ${WAIT_SECS}s"
        sleep 0.2
    done
}
wait_port "$up_port" "$up_pid" "the stand-in upstream"

PORTCULLIS_LOG=info qemu-aarch64 -L "$SYSROOT" "$BIN" run --config "$tmp/portcullis.toml" \
    >gateway.log 2>&1 &
gw_pid=$!
t0=$SECONDS
wait_port "$gw_port" "$gw_pid" "the gateway"
say "c) gateway under qemu listening on 127.0.0.1:$gw_port after $((SECONDS - t0))s (upstream on :$up_port)"

url="http://127.0.0.1:$gw_port/hello.txt"
if command -v curl >/dev/null; then
    curl -fsS -H "Authorization: Bearer $key" -o got.txt "$url" || die "the keyed request failed"
    status=$(curl -sS -o /dev/null -w '%{http_code}' "$url") || die "the request without a key failed"
else
    # get.py URL OUTFILE [KEY]: writes the body to OUTFILE, prints the status.
    cat >get.py <<'EOF'
import sys, urllib.error, urllib.request
url, out, key = sys.argv[1], sys.argv[2], sys.argv[3:]
headers = {"Authorization": "Bearer " + key[0]} if key else {}
try:
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as r:
        body, status = r.read(), r.status
except urllib.error.HTTPError as e:
    body, status = e.read(), e.code
with open(out, "wb") as f:
    f.write(body)
print(status)
EOF
    s=$("$PY" get.py "$url" got.txt "$key") || die "the keyed request failed"
    [[ $s == 200 ]] || die "the keyed request got $s, expected 200"
    status=$("$PY" get.py "$url" /dev/null) || die "the request without a key failed"
fi
cmp -s got.txt www/hello.txt || die "the keyed request returned '$(head -c 200 got.txt)', not the upstream's file"
say "c) with the key: 200, the upstream's file ($(wc -c <got.txt) bytes)"
[[ $status == 401 ]] || die "the request without a key got $status, expected 401"
say "c) without a key: 401"

kill -TERM "$gw_pid"
deadline=$((SECONDS + WAIT_SECS))
while kill -0 "$gw_pid" 2>/dev/null && ((SECONDS < deadline)); do sleep 0.2; done
kill -0 "$gw_pid" 2>/dev/null && die "the gateway did not exit within ${WAIT_SECS}s of SIGTERM"
rc=0
wait "$gw_pid" || rc=$?
gw_pid=''
[[ $rc -eq 0 ]] || die "the gateway exited with status $rc after SIGTERM, expected 0"
say "c) SIGTERM: the gateway exited with status 0"

"$PY" - "$tmp/audit.jsonl" <<'EOF' || die "the audit file lacks the expected request records"
import json, sys
records = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
requests = [r for r in records if r.get("event") == "request"]
ok = [r for r in requests if r.get("key_id") == "smoke" and r.get("status") == 200]
denied = [r for r in requests if r.get("status") == 401]
print("smoke-aarch64: c) audit: %d records (%s); request records: %s" % (
    len(records),
    ", ".join(sorted({r.get("event", "?") for r in records})),
    "; ".join("key_id=%s status=%s" % (r.get("key_id"), r.get("status")) for r in requests),
))
sys.exit(0 if ok and denied else 1)
EOF

say "PASS: $(basename "$BIN") $VERSION ($TARGET) under qemu: --version, check of the example config, keyed proxy 200, no key 401, clean SIGTERM exit, audit records"
