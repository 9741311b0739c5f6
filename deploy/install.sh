#!/usr/bin/env bash
# Installs portcullis as a systemd service. Safe to run again: it upgrades the binary and the unit,
# keeps an existing config and credential, and restarts the service.
#
# Usage (as root, from the repository or a copy holding deploy/ and config/):
#   sudo ./deploy/install.sh [PATH-TO-BINARY]          default: ./target/release/portcullis
#   sudo OPENROUTER_API_KEY=... ./deploy/install.sh     also writes the upstream secret
#
# Never prompts. What it does:
#   - system user and group "portcullis" (no login shell, no home directory)
#   - /etc/portcullis               0750 root:portcullis
#   - /etc/portcullis/portcullis.toml from config/portcullis.toml, only if absent (0640 root:portcullis)
#   - /etc/portcullis/credentials   0700 root:root; OPENROUTER_API_KEY written there (0600) if set
#   - /usr/local/bin/portcullis     0755
#   - /etc/systemd/system/portcullis.service
#   - `portcullis check`, then daemon-reload and enable --now (restart if it was running)
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(dirname "$SCRIPT_DIR")

BIN_SRC=${1:-./target/release/portcullis}
CONFIG_SRC="$REPO_DIR/config/portcullis.toml"
UNIT_SRC="$SCRIPT_DIR/portcullis.service"

ETC=/etc/portcullis
CONFIG="$ETC/portcullis.toml"
CRED_DIR="$ETC/credentials"
BIN=/usr/local/bin/portcullis
UNIT=/etc/systemd/system/portcullis.service
SERVICE=portcullis.service

die() { echo "install.sh: $*" >&2; exit 1; }
say() { echo "install.sh: $*"; }

[[ ${EUID:-$(id -u)} -eq 0 ]] || die "must run as root (try: sudo $0 $*)"
command -v systemctl >/dev/null || die "systemctl not found: this script installs a systemd service"
[[ -f "$BIN_SRC" && -x "$BIN_SRC" ]] || die "no executable at $BIN_SRC (build with: cargo build --release, or pass the binary's path)"
[[ -f "$UNIT_SRC" ]] || die "missing $UNIT_SRC"

# 1. System user and group.
if ! getent group portcullis >/dev/null; then
    groupadd --system portcullis
    say "created group portcullis"
fi
if ! getent passwd portcullis >/dev/null; then
    useradd --system --gid portcullis --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --comment "portcullis gateway" portcullis
    say "created user portcullis"
fi

# 2. Config directory and config (an existing config is never overwritten).
install -d -m 0750 -o root -g portcullis "$ETC"
if [[ -e "$CONFIG" ]]; then
    say "keeping existing $CONFIG"
else
    [[ -f "$CONFIG_SRC" ]] || die "missing $CONFIG_SRC"
    install -m 0640 -o root -g portcullis "$CONFIG_SRC" "$CONFIG"
    say "installed example config to $CONFIG (edit it, then: systemctl reload portcullis)"
fi

# 3. Credentials: read by systemd (LoadCredential=) as root, never by the service user directly.
install -d -m 0700 -o root -g root "$CRED_DIR"
if [[ -n "${OPENROUTER_API_KEY:-}" ]]; then
    tmp=$(mktemp "$CRED_DIR/.OPENROUTER_API_KEY.XXXXXX")
    printf '%s' "$OPENROUTER_API_KEY" >"$tmp"
    chown root:root "$tmp"
    chmod 0600 "$tmp"
    mv -f "$tmp" "$CRED_DIR/OPENROUTER_API_KEY"
    say "wrote $CRED_DIR/OPENROUTER_API_KEY"
elif [[ ! -e "$CRED_DIR/OPENROUTER_API_KEY" ]]; then
    say "warning: $CRED_DIR/OPENROUTER_API_KEY does not exist; the service will not start without it."
    say "         Re-run with OPENROUTER_API_KEY set, or create it (0600 root:root), or remove the"
    say "         LoadCredential= line from $UNIT if your config does not use it."
fi

# 4. Binary: copied next to the target and renamed over it, so a running binary is never
#    overwritten in place.
install -d -m 0755 /usr/local/bin
tmp=$(mktemp /usr/local/bin/.portcullis.XXXXXX)
install -m 0755 -o root -g root "$BIN_SRC" "$tmp"
mv -f "$tmp" "$BIN"
say "installed $("$BIN" --version) to $BIN"

# 5. Unit.
install -m 0644 -o root -g root "$UNIT_SRC" "$UNIT"
say "installed $UNIT"

# 6. Validate the config as the service will see it: working directory /, no inherited
#    environment (so no .env and no OPENROUTER_API_KEY from this shell), credentials from the
#    credentials directory. It runs as root, so whether the portcullis user can read the
#    certificate files is only seen when the service starts (keep them 0640 root:portcullis).
say "checking $CONFIG"
if ! (cd / && env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin CREDENTIALS_DIRECTORY="$CRED_DIR" \
        "$BIN" check --config "$CONFIG"); then
    die "the config is not valid; fix $CONFIG and run this script again (the service was not (re)started)"
fi

# 7. Start, or restart to pick up the new binary and unit.
was_active=no
systemctl is-active --quiet "$SERVICE" && was_active=yes
systemctl daemon-reload
systemctl enable --now "$SERVICE"
if [[ $was_active == yes ]]; then
    systemctl restart "$SERVICE"
    say "restarted $SERVICE"
fi
systemctl --no-pager --lines=0 status "$SERVICE" || true
say "done. Logs: journalctl -u portcullis -f"
