#!/usr/bin/env bash
# Install LeukoScreen as a systemd service on Raspberry Pi OS (bookworm or later).
#
#     sudo bash systemd/install.sh          (or: make install-service)
#
# Creates the `leukoscreen` system user (groups video and gpio), copies this checkout to /opt/leukoscreen,
# builds a venv there with --system-site-packages (so apt's picamera2 and lgpio are visible), installs
# .[device] into it, puts the default config in /etc/leukoscreen/config.toml (kept if present) and the trusted
# bundle keys in /etc/leukoscreen/keys, installs the technician's command /usr/local/sbin/leukoscreen, runs the
# self-test as the service user, then installs, enables and starts leukoscreen.service.
#
# Environment: PREFIX (default /opt/leukoscreen); PIP_OPTS, e.g. "--no-index --find-links /media/wheels"
# for an offline install; SKIP_APT=1 to skip apt-get; SKIP_SELFTEST=1; NO_START=1 to enable without starting.
set -euo pipefail

PREFIX=${PREFIX:-/opt/leukoscreen}
SERVICE_USER=leukoscreen
UNIT=leukoscreen.service
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CONF_DIR=/etc/leukoscreen
STATE_DIR=/var/lib/leukoscreen
PIP_OPTS=${PIP_OPTS:-}

say() { printf '==> %s\n' "$*"; }
die() { printf 'install.sh: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "run as root: sudo bash systemd/install.sh"
command -v systemctl >/dev/null || die "systemd is required"
[ -f "$SRC/device/cli.py" ] || die "$SRC does not look like a LeukoScreen checkout"

if [ "${SKIP_APT:-0}" != 1 ] && command -v apt-get >/dev/null; then
  say "apt: python3-venv, python3-picamera2, python3-lgpio, python3-cryptography"
  apt-get install -y --no-install-recommends python3-venv python3-picamera2 python3-lgpio python3-cryptography \
    || die "apt-get failed; install python3-venv python3-picamera2 python3-lgpio python3-cryptography by hand, or SKIP_APT=1"
fi

say "user $SERVICE_USER"
if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
  useradd --system --user-group --home-dir "$STATE_DIR" --no-create-home --shell /usr/sbin/nologin \
    --comment "LeukoScreen appliance" "$SERVICE_USER"
fi
for g in video gpio plugdev apex; do  # camera, GPIO, and a Coral Edge TPU (USB: plugdev, PCIe: apex)
  if getent group "$g" >/dev/null; then usermod -aG "$g" "$SERVICE_USER"; fi
done

if [ "$SRC" != "$PREFIX" ]; then
  say "copy $SRC -> $PREFIX"
  mkdir -p "$PREFIX"
  tar -C "$SRC" --exclude=./.git --exclude=./.venv --exclude=./state --exclude=./build --exclude='*.pyc' \
    --exclude=__pycache__ -cf - . | tar -C "$PREFIX" -xf -
fi
[ -f "$PREFIX/models/manifest.json" ] || die "$PREFIX/models has no bundle; build it with 'make convert' or copy models/"
chown -R root:root "$PREFIX"
chmod -R u=rwX,go=rX "$PREFIX"

say "venv $PREFIX/.venv (--system-site-packages)"
if [ ! -x "$PREFIX/.venv/bin/python" ]; then
  python3 -m venv --system-site-packages "$PREFIX/.venv"
fi
# shellcheck disable=SC2086  # PIP_OPTS is a list of options
"$PREFIX/.venv/bin/python" -m pip install $PIP_OPTS -q -e "$PREFIX[device]"
"$PREFIX/.venv/bin/python" -c "import picamera2" 2>/dev/null \
  || echo "warning: picamera2 is not importable from the venv (apt install python3-picamera2); the camera will fault" >&2

say "config $CONF_DIR/config.toml"
install -d -m 0755 "$CONF_DIR"
if [ ! -f "$CONF_DIR/config.toml" ]; then
  install -m 0644 "$PREFIX/device/config/default.toml" "$CONF_DIR/config.toml"
fi
"$PREFIX/.venv/bin/python" -m device check-config --config "$CONF_DIR/config.toml" >/dev/null \
  || die "$CONF_DIR/config.toml is not valid (see above)"
say "trusted bundle keys $CONF_DIR/keys (existing keys are kept)"
install -d -m 0755 "$CONF_DIR/keys"
for k in "$PREFIX"/device/config/keys/*.pub; do
  [ -e "$k" ] || continue
  [ -e "$CONF_DIR/keys/$(basename "$k")" ] || install -m 0644 "$k" "$CONF_DIR/keys/"
done
install -m 0755 "$PREFIX/systemd/leukoscreen" /usr/local/sbin/leukoscreen
install -d -o "$SERVICE_USER" -g "$SERVICE_USER" -m 0750 "$STATE_DIR"

if systemctl is-active --quiet "$UNIT"; then
  say "stop the running $UNIT (it holds the camera and the pins)"
  systemctl stop "$UNIT"
fi

if [ "${SKIP_SELFTEST:-0}" != 1 ]; then
  say "self-test as $SERVICE_USER (watch the LEDs: green, amber, red)"
  (cd "$PREFIX" && runuser -u "$SERVICE_USER" -- env STATE_DIRECTORY="$STATE_DIR" CONFIGURATION_DIRECTORY="$CONF_DIR" \
    "$PREFIX/.venv/bin/python" -m device selftest --config "$CONF_DIR/config.toml") \
    || die "self-test failed (see above); fix it, or SKIP_SELFTEST=1 to install anyway"
fi

say "unit /etc/systemd/system/$UNIT"
install -m 0644 "$PREFIX/systemd/$UNIT" "/etc/systemd/system/$UNIT"
version=$(systemctl --version | awk 'NR==1 {print $2}')
dropin="/etc/systemd/system/$UNIT.d"
if [ "${version%%.*}" -ge 254 ] 2>/dev/null; then
  install -d -m 0755 "$dropin"
  printf '[Service]\n# growing delay between restarts (systemd >= 254)\nRestartSteps=5\nRestartMaxDelaySec=120\n' \
    > "$dropin/backoff.conf"
else
  rm -f "$dropin/backoff.conf"
fi
systemctl daemon-reload
systemctl enable "$UNIT"
if [ "${NO_START:-0}" != 1 ]; then
  systemctl restart "$UNIT"
  say "started; follow it with: journalctl -u $UNIT -f"
  say "page token: sudo cat $STATE_DIR/token"
fi
