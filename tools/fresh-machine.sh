#!/usr/bin/env bash
# The fresh-machine check (README, "Fresh-machine check"): what a newcomer gets on a clean Debian bookworm.
#
#   tools/fresh-machine.sh amd64   (make fresh-check)
#     A bookworm root made by debootstrap (minbase + git, make, python3, python3-venv, nothing else); this
#     repository's current commit cloned into it, then
#       1. as a user without sudo: `make test` must stop before installing anything, with the apt-get line;
#       2. as root: `make test` must pass with no manual step (it installs Chromium itself), and
#          `git status --porcelain` must be empty afterwards.
#   tools/fresh-machine.sh arm64   (make fresh-check-arm64)
#     The same root for arm64 under qemu-user (a stand-in for Raspberry Pi OS 64-bit): `make install-device`,
#     `python -m device selftest` (its reference-image line is the ARM rounding margin), `classify --json`
#     on device/samples, and the samples' decisions and raw int8 features compared with this x86 machine's.
#
# Needs root and debootstrap; arm64 also qemu-user-static and binfmt-support. Everything goes under
# $FRESH_ROOTS (default /var/tmp/leukoscreen-fresh), never inside the repository: a pristine base root per
# architecture (made once, copied for every run; FRESH_REBUILD_BASE=1 remakes it), a pip cache shared by the
# runs, logs, and <arch>-result.json with the figures for the README. Mounts are undone on exit, and the run's
# root is deleted unless FRESH_KEEP=1.
#
# Network: Debian's mirror (FRESH_MIRROR) and PyPI. pip inside an emulated arm64 root cannot do TLS, so arm64
# wheels are downloaded on the host (pip download --platform ...) and installed there with --no-index. Local
# wheel folders or file:// indexes of this machine's pip configuration (PIP_FIND_LINKS, pip's extra-index-url)
# are passed through read-only when present; without them pip takes everything from PyPI (then torch is the
# CUDA build: several GB more, same results).
set -euo pipefail

ARCH=${1:-}
case "$ARCH" in amd64|arm64) ;; *) echo "usage: $0 amd64|arm64" >&2; exit 2 ;; esac
[ "$(id -u)" -eq 0 ] || { echo "$0: needs root (debootstrap, chroot, mounts); run: sudo $0 $ARCH" >&2; exit 2; }
command -v debootstrap >/dev/null || { echo "$0: run: apt-get install -y debootstrap" >&2; exit 2; }

REPO=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
COMMIT=$(git -C "$REPO" rev-parse HEAD)
BRANCH=$(git -C "$REPO" rev-parse --abbrev-ref HEAD)
if [ -n "$(git -C "$REPO" status --porcelain --untracked-files=no)" ]; then
  echo "$0: note: $REPO has uncommitted changes; the check clones commit ${COMMIT:0:12} without them" >&2
fi
ROOTS=${FRESH_ROOTS:-/var/tmp/leukoscreen-fresh}
MIRROR=${FRESH_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
PACKAGES=git,make,python3,python3-venv
BASE=$ROOTS/base-$SUITE-$ARCH
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUN=$ROOTS/run-$ARCH-$STAMP
LOGS=$ROOTS/logs
RESULT=$ROOTS/$ARCH-result.json
PIP_CACHE=$ROOTS/pip-cache
mkdir -p "$ROOTS" "$LOGS" "$PIP_CACHE"
LOG=$LOGS/$ARCH-$STAMP.log
HOST_PY=${FRESH_HOST_PYTHON:-$REPO/.venv/bin/python}  # arm64: runs device/ on x86 for the comparison
[ -x "$HOST_PY" ] || HOST_PY=python3
T0=$(date +%s)

say() { echo "[fresh-machine $ARCH $(date -u +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

cleanup() {
  local rc=$?
  # every mount below the run's root, deepest first (proc, sys, dev and its submounts, binds)
  if [ -n "${RUN:-}" ]; then
    awk -v r="$RUN" '$2 == r || index($2, r "/") == 1 {print $2}' /proc/self/mounts | sort -r |
      while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
    if [ "${FRESH_KEEP:-0}" = 1 ]; then
      say "kept $RUN (FRESH_KEEP=1)"
    elif [ -d "$RUN" ]; then
      rm -rf --one-file-system "$RUN"
    fi
  fi
  exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

make_base() {
  if [ -f "$BASE/.complete" ] && [ "${FRESH_REBUILD_BASE:-0}" != 1 ]; then
    say "base root $BASE (made $(cat "$BASE/.complete"))"
    return
  fi
  rm -rf --one-file-system "$BASE"
  say "debootstrap $SUITE $ARCH (minbase + $PACKAGES) into $BASE"
  local cache=$ROOTS/debs-$ARCH
  mkdir -p "$cache"
  if [ "$ARCH" = amd64 ]; then
    nice -n 19 debootstrap --variant=minbase --include="$PACKAGES" --cache-dir="$cache" "$SUITE" "$BASE" \
      "$MIRROR" >>"$LOG" 2>&1
  else
    enable_qemu
    nice -n 19 debootstrap --arch=arm64 --foreign --variant=minbase --include="$PACKAGES" --cache-dir="$cache" \
      "$SUITE" "$BASE" "$MIRROR" >>"$LOG" 2>&1
    cp /usr/bin/qemu-aarch64-static "$BASE/usr/bin/"
    nice -n 19 chroot "$BASE" /debootstrap/debootstrap --second-stage >>"$LOG" 2>&1
  fi
  rm -rf "$BASE"/var/cache/apt/archives/*.deb
  date -u +%Y-%m-%dT%H:%MZ >"$BASE/.complete"
}

enable_qemu() {
  command -v qemu-aarch64-static >/dev/null ||
    { echo "$0: run: apt-get install -y qemu-user-static binfmt-support" >&2; exit 2; }
  [ -e /proc/sys/fs/binfmt_misc/register ] || mount binfmt_misc -t binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] ||
    { echo "$0: the qemu-aarch64 binfmt handler is not registered (update-binfmts --enable qemu-aarch64)" >&2; exit 2; }
}

bind() {  # bind SRC DST-inside-root [ro]
  mkdir -p "$RUN$2"
  mount --bind "$1" "$RUN$2"
  if [ "${3:-}" = ro ]; then mount -o remount,bind,ro "$RUN$2"; fi
}

# a clean environment inside the root: nothing of this machine's shell leaks in except what is listed
ENV_IN=(HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 TERM=dumb)
in_root() { chroot "$RUN" env -i "${ENV_IN[@]}" "$@"; }

setup_run() {
  [ "$ARCH" = arm64 ] && enable_qemu
  make_base
  say "copy the base root to $RUN"
  cp -a "$BASE" "$RUN"
  cp /etc/resolv.conf "$RUN/etc/resolv.conf"
  mount -t proc proc "$RUN/proc"
  mount -t sysfs sys "$RUN/sys"
  mount --rbind /dev "$RUN/dev"
  mount --make-rslave "$RUN/dev"
  bind "$PIP_CACHE" /root/.cache/pip
  # the repository as a newcomer's remote: a bare clone of this commit's branch
  git clone -q --bare --no-hardlinks "$REPO" "$RUN/srv/leukoscreen.git"
  if [ "$BRANCH" != HEAD ]; then  # the commit this check started from, even if the branch moved on since
    git -C "$RUN/srv/leukoscreen.git" update-ref "refs/heads/$BRANCH" "$COMMIT"
    git -C "$RUN/srv/leukoscreen.git" symbolic-ref HEAD "refs/heads/$BRANCH"
  else
    git -C "$RUN/srv/leukoscreen.git" update-ref --no-deref HEAD "$COMMIT"
  fi
  chmod -R a+rX "$RUN/srv"
}

pip_passthrough() {  # local wheel folders / file:// indexes of this machine's pip configuration
  local links=${PIP_FIND_LINKS:-} extra dirs=() d
  extra=$("$HOST_PY" -m pip config get global.extra-index-url 2>/dev/null || true)
  [ -z "$links" ] && links=$("$HOST_PY" -m pip config get global.find-links 2>/dev/null || true)
  local found_links=() found_extra=()
  for d in $links; do [ -d "$d" ] && { bind "$d" "$d" ro; found_links+=("$d"); }; done
  for d in $extra; do  # a file:// index's pages link to ../../files/...: bind the folder above .../simple
    case "$d" in file://*)
      local p=${d#file://}; p=${p%/}; [ "$(basename "$p")" = simple ] && p=$(dirname "$p")
      [ -d "$p" ] && { bind "$p" "$p" ro; found_extra+=("$d"); } ;;
    esac
  done
  [ ${#found_links[@]} -gt 0 ] && ENV_IN+=("PIP_FIND_LINKS=${found_links[*]}")
  [ ${#found_extra[@]} -gt 0 ] && ENV_IN+=("PIP_EXTRA_INDEX_URL=${found_extra[*]}")
  # a network whose TLS proxy needs this machine's CA bundle (pip's own certifi does not have it)
  local cert=${PIP_CERT:-$("$HOST_PY" -m pip config get global.cert 2>/dev/null || true)}
  if [ -n "$cert" ] && [ -f "$cert" ]; then
    cp "$cert" "$RUN/etc/host-ca-bundle.crt"
    ENV_IN+=(PIP_CERT=/etc/host-ca-bundle.crt)
  fi
  say "pip: PyPI + local ${found_links[*]:-} ${found_extra[*]:-} (cache $PIP_CACHE)${cert:+, CA bundle $cert}"
}

json_result() { "$HOST_PY" -c 'import json,sys; print(json.dumps(dict(a.split("=",1) for a in sys.argv[1:]), indent=1))' "$@" >"$RESULT"; }

run_amd64() {
  setup_run
  pip_passthrough
  say "1. a user without sudo: make test must stop before the suite and name the command"
  in_root useradd -m -s /bin/bash newcomer
  # the user's own copy of the remote: git refuses to read a repository another user owns
  cp -a "$RUN/srv/leukoscreen.git" "$RUN/home/newcomer/remote.git"
  in_root chown -R newcomer:newcomer /home/newcomer/remote.git
  set +e
  early=$(chroot "$RUN" runuser -u newcomer -- env -i HOME=/home/newcomer PATH=/usr/bin:/bin LANG=C.UTF-8 \
    bash -c 'cd ~ && git clone -q remote.git leukoscreen && cd leukoscreen && make test' 2>&1)
  early_rc=$?
  set -e
  echo "$early" >>"$LOG"
  early_line=$(echo "$early" | grep -m1 '^make test:' || true)
  early_ok=false
  if [ $early_rc -ne 0 ] && [[ "$early_line" == *"sudo apt-get install -y chromium"* ]] &&
     [ ! -e "$RUN/home/newcomer/leukoscreen/.venv" ]; then early_ok=true; fi
  say "   exit $early_rc, venv made: $([ -e "$RUN/home/newcomer/leukoscreen/.venv" ] && echo yes || echo no): $early_line"

  say "2. root: git clone + make test (log: $LOG)"
  set +e
  in_root bash -c 'cd /root && git clone -q /srv/leukoscreen.git leukoscreen && cd leukoscreen &&
                   nice -n 19 make test' >>"$LOG" 2>&1
  test_rc=$?
  set -e
  summary=$(grep -E '^=+ .*(passed|failed|error).* in [0-9.]+s' "$LOG" | tail -1 | sed 's/=//g; s/^ *//; s/ *$//' ||
            true)
  [ -n "$summary" ] || summary="no pytest summary (see the log)"
  porcelain=$(in_root git -C /root/leukoscreen status --porcelain 2>&1 || true)
  say "   make test exit $test_rc: $summary"
  say "   git status --porcelain after make test: ${porcelain:-(empty)}"
  clean=$([ -z "$porcelain" ] && echo true || echo false)
  pass=$([ $test_rc -eq 0 ] && [ "$clean" = true ] && [ "$early_ok" = true ] && echo PASS || echo FAIL)
  json_result arch=amd64 date="$(date -u +%Y-%m-%d)" commit="${COMMIT:0:12}" result="$pass" \
    make_test_exit="$test_rc" summary="$summary" porcelain_empty="$clean" porcelain="$porcelain" \
    no_sudo_exit="$early_rc" no_sudo_stopped_early="$early_ok" no_sudo_message="$early_line" \
    minutes="$(( ($(date +%s) - T0) / 60 ))" log="$LOG"
  say "result $pass -> $RESULT"
  cat "$RESULT"
  [ "$pass" = PASS ]
}

arm64_wheels() {  # the device's dependencies as aarch64 wheels for the root's Python (3.11, glibc 2.36)
  local dir=$ROOTS/wheels-arm64 reqs
  mkdir -p "$dir"
  reqs=$("$HOST_PY" -c 'import tomllib,sys; d=tomllib.load(open(sys.argv[1],"rb"))["project"]
print(" ".join(d["dependencies"] + d["optional-dependencies"]["device"]))' "$REPO/pyproject.toml")
  say "host: pip download aarch64 wheels: $reqs pip setuptools"
  # shellcheck disable=SC2086
  "$HOST_PY" -m pip download -q --only-binary=:all: --python-version 3.11 --implementation cp --abi cp311 \
    --abi abi3 --abi none --platform manylinux_2_36_aarch64 --platform manylinux_2_28_aarch64 \
    --platform manylinux_2_27_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64 \
    --platform linux_aarch64 --platform any -d "$dir" $reqs pip "setuptools>=68" >>"$LOG" 2>&1
  bind "$dir" /wheels ro
  ENV_IN+=(PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels)
}

run_arm64() {
  setup_run
  arm64_wheels
  local out=$LOGS/arm64-$STAMP
  mkdir -p "$out"
  say "arm64 root: $(in_root uname -m), $(in_root python3 --version)"
  say "1. git clone + make install-device (pip --no-index from the host-downloaded wheels)"
  set +e
  in_root bash -c 'cd /root && git clone -q /srv/leukoscreen.git leukoscreen && cd leukoscreen &&
                   make install-device' >>"$LOG" 2>&1
  install_rc=$?
  say "   exit $install_rc; 2. python -m device selftest"
  in_root bash -c 'cd /root/leukoscreen && .venv/bin/python -m device selftest' >"$out/selftest.txt" 2>&1
  selftest_rc=$?
  cat "$out/selftest.txt" >>"$LOG"
  refline=$(grep -m1 -E '^(ok|FAIL) +references:' "$out/selftest.txt" || true)
  say "   exit $selftest_rc: $refline"
  say "3. classify --json device/samples/*.jpg, and the samples' int8 features (tools/screen_dump.py)"
  in_root bash -c 'cd /root/leukoscreen && .venv/bin/python -m device classify --json device/samples/*.jpg' \
    >"$out/classify-arm64.jsonl" 2>>"$LOG"
  classify_rc=$?
  in_root bash -c 'cd /root/leukoscreen && .venv/bin/python tools/screen_dump.py dump /root/arm64.npz \
                   device/samples/*.jpg' >>"$LOG" 2>&1
  dump_rc=$?
  cp "$RUN/root/arm64.npz" "$out/" 2>/dev/null
  say "4. the same on this x86 machine ($HOST_PY), same commit"
  (cd "$RUN/root/leukoscreen" && "$HOST_PY" -m device classify --json device/samples/*.jpg) \
    >"$out/classify-x86.jsonl" 2>>"$LOG"
  (cd "$RUN/root/leukoscreen" && "$HOST_PY" tools/screen_dump.py dump "$out/x86.npz" device/samples/*.jpg) \
    >>"$LOG" 2>&1
  cmp=$("$HOST_PY" "$REPO/tools/screen_dump.py" compare "$out/x86.npz" "$out/arm64.npz" 2>>"$LOG")
  cls=$("$HOST_PY" -c 'import json,sys
a=[json.loads(l) for l in open(sys.argv[1])]; b=[json.loads(l) for l in open(sys.argv[2])]
same=sum((x["status"],x["label"])==(y["status"],y["label"]) for x,y in zip(a,b))
print(f"{same}/{len(a)}" if len(a)==len(b) and a else "0/0")' "$out/classify-x86.jsonl" "$out/classify-arm64.jsonl")
  set -e
  say "   classify decisions identical: $cls; samples' features: $cmp"
  read -r max_lsb frac prob agree n <<<"$("$HOST_PY" -c 'import json,sys; d=json.loads(sys.argv[1])
print(d["max_lsb"], d["fraction_values_differing"], d["max_prob_diff"], d["decisions_identical"], d["images"])' \
    "$cmp" || echo "- - - - -")"
  pass=FAIL
  if [ $install_rc -eq 0 ] && [ $selftest_rc -eq 0 ] && [ $classify_rc -eq 0 ] && [ $dump_rc -eq 0 ] &&
     [ "$agree" = "$n" ] && [ "$cls" = "$n/$n" ] && [[ "$refline" == ok* ]]; then pass=PASS; fi
  json_result arch=arm64 date="$(date -u +%Y-%m-%d)" commit="${COMMIT:0:12}" result="$pass" \
    install_device_exit="$install_rc" selftest_exit="$selftest_rc" selftest_references="$refline" \
    classify_decisions_identical="$cls" samples_max_lsb="$max_lsb" samples_fraction_values_differing="$frac" \
    samples_max_prob_diff="$prob" minutes="$(( ($(date +%s) - T0) / 60 ))" outputs="$out" log="$LOG"
  say "result $pass -> $RESULT"
  cat "$RESULT"
  [ "$pass" = PASS ]
}

say "commit ${COMMIT:0:12} ($BRANCH) of $REPO; log $LOG"
"run_$ARCH"
