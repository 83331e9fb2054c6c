#!/usr/bin/env bash
# Before `make test`: the system packages the suite needs, from apt where this user may install them (root, or
# sudo without a password). Where it may not, one line with the exact command, and exit 1 before anything else
# runs (the Python dependencies take minutes to install; finding out after them is worse).
#
#   chromium      /usr/bin/chromium, for the browser test of the status page (LEUKO_NO_BROWSER=1 skips that test)
#   libatomic1    libatomic.so.1, which Playwright's bundled node driver loads (Chromium does not pull it in)
#   python3-venv  `python3 -m venv` for the .venv (Debian splits ensurepip out of python3); only before .venv exists
#
# Environment: PY (python3), VENV (.venv), LEUKO_NO_BROWSER.
set -euo pipefail
PY=${PY:-python3}
VENV=${VENV:-.venv}
need=()
if [ "${LEUKO_NO_BROWSER:-}" != 1 ] && [ ! -x /usr/bin/chromium ]; then
  need+=(chromium)
fi
if [ "${LEUKO_NO_BROWSER:-}" != 1 ] && ! { PATH=$PATH:/sbin:/usr/sbin ldconfig -p 2>/dev/null | grep -q 'libatomic\.so\.1 '; }; then
  need+=(libatomic1)
fi
if [ ! -x "$VENV/bin/python" ] && ! "$PY" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need+=(python3-venv)
fi
[ ${#need[@]} -eq 0 ] && exit 0

what="${need[*]}"
if ! command -v apt-get >/dev/null 2>&1; then
  echo "make test: needs ${what} (Debian package names; /usr/bin/chromium must exist) and this system has no apt-get: install them with your package manager, then run make test again" >&2
  exit 1
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true >/dev/null 2>&1; then
  sudo=(sudo -n)
else
  echo "make test: missing system package(s) ${what}; run: sudo apt-get update && sudo apt-get install -y ${what}" >&2
  exit 1
fi
echo "make test: installing ${what} from apt (${sudo[*]:-as root})" >&2
if ! { "${sudo[@]}" apt-get update -qq && DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq \
        --no-install-recommends "${need[@]}" >/dev/null; }; then
  echo "make test: could not install ${what} with apt-get (see above); run: sudo apt-get update && sudo apt-get install -y ${what}" >&2
  exit 1
fi
