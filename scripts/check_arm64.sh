#!/usr/bin/env bash
# make check-arm64: the device agent on linux/aarch64, for real, on an x86_64 host.
#
# Flow (each step is skipped when its result is already in the cached root):
#   1. host tools (debootstrap, qemu-user-static, binfmt-support) and the qemu-aarch64 binfmt handler
#   2. a Debian bookworm arm64 root (debootstrap, second stage emulated) with python3 3.11, venv, CA certificates
#   3. the host's pip configuration and extra CA certificates carried into the root
#   4. a venv in the root with the agent installed from its wheel, extras agent,onnx,tflite, plus the test tools
#   5. the agent's test subset (scripts/arm64-tests.txt) run in the root under emulation
#
# Not part of `make test` (the first run builds the root: about 10-17 minutes on 2 cores; later runs reuse it).
# Known traps handled here (see docs/install-device.md, "Checking the agent on arm64"): the host's /sys is never
# mounted in the root (ONNX Runtime segfaults at import under qemu with it); numpy's spurious floating-point
# warnings under emulation are not turned into errors.
#
# Usage: scripts/check_arm64.sh [PYTHON]    (PYTHON builds the wheel; default .venv/bin/python)
# Environment: EDGEFLEET_ARM64_ROOT (cache, default ~/.cache/edgefleet/arm64-root), EDGEFLEET_ARM64_MIRROR,
#              EDGEFLEET_ARM64_PYTEST_ARGS (extra pytest arguments, e.g. "-x -k tuf").
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY="${1:-$REPO/.venv/bin/python}"
ROOT="${EDGEFLEET_ARM64_ROOT:-$HOME/.cache/edgefleet/arm64-root}"
SUITE=bookworm
EXTRAS="agent,onnx,tflite"
# Test tools only (onnx builds the tiny test models of bundles.testing); a real device does not install them.
TEST_TOOLS=("pytest>=8" "pytest-timeout>=2.3" "hypothesis>=6.100" "onnx>=1.17")
SELECTION="$REPO/scripts/arm64-tests.txt"
APP=/opt/edgefleet
T0=$(date +%s)
declare -a TIMINGS=()

log() { printf '\n== [%4ss] %s\n' "$(( $(date +%s) - T0 ))" "$*"; }
die() { echo "check-arm64: $*" >&2; exit 1; }
timed() {  # timed LABEL CMD...: run CMD, remember how long it took, keep its exit status
  local label=$1 start rc=0; shift; start=$(date +%s)
  "$@" || rc=$?
  TIMINGS+=("$(printf '%-60s %5ss%s' "$label" "$(( $(date +%s) - start ))" "$( (( rc )) && echo "  (exit $rc)")")")
  return "$rc"
}
in_root_at() {  # in_root_at DIR CMD...: run CMD in the root, in DIR, with a clean environment plus the host's PIP_*
  local dir=$1; shift
  chroot "$ROOT" /usr/bin/env -i -C "$dir" PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive "${PIP_ENV[@]}" "$@"
}
in_root() { in_root_at / "$@"; }

[[ $(id -u) -eq 0 ]] || die "needs root (debootstrap, chroot, mount, binfmt_misc); run it as root"
[[ -x "$PY" ]] || die "no Python at $PY to build the wheel (run make setup, or pass one)"

# --- mounts: /proc and /dev only, never /sys ------------------------------------------------------------------------
mounts_under_root() { findmnt -rn -o TARGET | awk -v r="$ROOT" 'index($0, r"/") == 1' | sort -r; }
unmount_all() {
  local m
  for m in $(mounts_under_root); do umount -l "$m" 2>/dev/null || true; done
}
mount_pseudo() {
  mountpoint -q "$ROOT/proc" || mount -t proc proc "$ROOT/proc"
  if ! mountpoint -q "$ROOT/dev"; then
    mount --rbind /dev "$ROOT/dev" && mount --make-rslave "$ROOT/dev"
  fi
}
trap unmount_all EXIT
remove_root() {
  unmount_all
  [[ -z "$(mounts_under_root)" ]] || die "refusing to delete $ROOT: something is still mounted under it"
  rm -rf --one-file-system "$ROOT"
}

# --- 1. host tools and binfmt -----------------------------------------------------------------------------------------
host_tools() {
  local missing=() pkg
  for pkg in debootstrap qemu-user-static binfmt-support; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  if (( ${#missing[@]} )); then
    log "installing host packages: ${missing[*]}"
    apt-get update -q && apt-get install -y -q "${missing[@]}"
  fi
}
register_binfmt() {
  [[ $(uname -m) == aarch64 ]] && return 0  # native: nothing to emulate
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true
  grep -q '^enabled' /proc/sys/fs/binfmt_misc/qemu-aarch64 2>/dev/null \
    || die "the qemu-aarch64 binfmt handler could not be registered (is binfmt_misc available to this container?)"
  grep -q '^flags: .*F' /proc/sys/fs/binfmt_misc/qemu-aarch64 \
    || die "the qemu-aarch64 binfmt handler lacks the F flag: the chroot would need a copy of qemu inside"
}

# --- 2. the Debian arm64 root ------------------------------------------------------------------------------------------
host_mirror() {
  local uri
  uri=$(grep -hs -m1 -oP '^URIs:\s*\Khttps?://\S+/debian/?$' /etc/apt/sources.list.d/*.sources || true)
  [[ -n "$uri" ]] || uri=$(grep -hs -m1 -oP '^deb\s+\Khttps?://\S+/debian/?(?=\s)' /etc/apt/sources.list || true)
  echo "${EDGEFLEET_ARM64_MIRROR:-${uri:-http://deb.debian.org/debian}}"
}
debootstrap_stage1() { debootstrap --arch=arm64 --variant=minbase --foreign "$SUITE" "$ROOT" "$(host_mirror)"; }
debootstrap_stage2() { chroot "$ROOT" /debootstrap/debootstrap --second-stage; }
root_python() {
  mount_pseudo
  in_root apt-get update -q
  in_root apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates
  in_root apt-get clean
}
build_root() {
  if [[ -f "$ROOT/.edgefleet-base" ]]; then
    log "reusing the arm64 root at $ROOT"
    return
  fi
  [[ -e "$ROOT" ]] && { log "removing an unfinished root at $ROOT"; remove_root; }
  mkdir -p "$(dirname "$ROOT")"
  log "debootstrap $SUITE arm64 into $ROOT from $(host_mirror)"
  timed "debootstrap stage 1" debootstrap_stage1
  timed "debootstrap stage 2 (emulated)" debootstrap_stage2
  timed "apt install python3, venv, certificates" root_python
  touch "$ROOT/.edgefleet-base"
}

# --- 3. the host's pip configuration and CA certificates ---------------------------------------------------------------
# find-links and file:// indexes hold x86_64 wheels at host paths: useless (and misleading) inside the root.
filter_pip_conf() { grep -viE '^\s*find[-_]links\s*=|file://' "$1" > "$2" || true; }
declare -a PIP_ENV=()
carry_pip_config() {
  local name value f
  for name in $(compgen -e | grep '^PIP_' || true); do
    value=${!name}
    [[ $name == PIP_FIND_LINKS || $value == *file://* ]] && continue
    PIP_ENV+=("$name=$value")
  done
  [[ -f /etc/pip.conf ]] && filter_pip_conf /etc/pip.conf "$ROOT/etc/pip.conf"
  if [[ -d /etc/xdg/pip ]]; then
    mkdir -p "$ROOT/etc/xdg/pip"
    for f in /etc/xdg/pip/*; do
      case $f in *.conf) filter_pip_conf "$f" "$ROOT/etc/xdg/pip/$(basename "$f")" ;; *) cp "$f" "$ROOT/etc/xdg/pip/" ;; esac
    done
  fi
  for f in "$HOME/.config/pip/pip.conf" "$HOME/.pip/pip.conf"; do
    [[ -f $f ]] && mkdir -p "$ROOT/root/.config/pip" && filter_pip_conf "$f" "$ROOT/root/.config/pip/pip.conf"
  done
  # update-ca-certificates takes most of a minute under emulation: only when the host's extra CAs changed.
  local cas=/usr/local/share/ca-certificates
  [[ -d $cas ]] || return 0
  if ! diff -rq "$cas" "$ROOT$cas" >/dev/null 2>&1; then
    rm -rf "${ROOT:?}$cas" && mkdir -p "$ROOT$cas" && cp -r "$cas/." "$ROOT$cas/"
    in_root update-ca-certificates --fresh >/dev/null
  fi
}

# --- 4. the agent from its wheel -----------------------------------------------------------------------------------------
build_wheel() {
  rm -rf "$REPO/build/arm64-wheel"
  "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$REPO/build/arm64-wheel" "$REPO"
}
install_agent() {
  local wheel deps_key venv="$APP/venv"
  wheel=$(basename "$(ls "$REPO"/build/arm64-wheel/edgefleet-*.whl)")
  mkdir -p "$ROOT$APP/wheels"
  rm -f "$ROOT$APP"/wheels/*.whl
  cp "$REPO/build/arm64-wheel/$wheel" "$ROOT$APP/wheels/"
  # The dependency set (the core and device extras' pins, the test tools) decides whether the cached venv is good.
  deps_key=$( { "$PY" -c 'import json, sys
try: import tomllib
except ImportError: import tomli as tomllib  # Python 3.10 (the agent extra brings it)
d = tomllib.load(open(sys.argv[1], "rb"))["project"]
print(json.dumps([d["dependencies"], *(d["optional-dependencies"][e] for e in sys.argv[2].split(","))]))' \
      "$REPO/pyproject.toml" "$EXTRAS"
    printf '%s\n' "$EXTRAS" "${TEST_TOOLS[@]}"; } | sha256sum | cut -c1-12)
  if [[ ! -f "$ROOT$venv/.deps-$deps_key" ]]; then
    rm -rf "$ROOT$venv"
    log "creating $venv (Python $(in_root python3 -c 'import platform; print(platform.python_version())'))"
    in_root python3 -m venv "$venv"
    timed "venv: pip, the agent's dependencies, test tools" \
      in_root "$venv/bin/pip" install -q --upgrade pip "$APP/wheels/$wheel[$EXTRAS]" "${TEST_TOOLS[@]}"
    touch "$ROOT$venv/.deps-$deps_key"
  fi
  timed "install the agent wheel ($wheel)" \
    in_root "$venv/bin/pip" install -q --force-reinstall --no-deps "$APP/wheels/$wheel"
  in_root "$venv/bin/pip" check
}

# --- 5. the test subset ----------------------------------------------------------------------------------------------------
copy_tests() {
  rm -rf "$ROOT$APP/src"
  mkdir -p "$ROOT$APP/src"
  # Only the tests, the docs some of them compare with the code, and the pytest configuration: the code under test
  # is the installed wheel, never a checkout.
  cp -r "$REPO/tests" "$REPO/docs" "$ROOT$APP/src/"
  find "$ROOT$APP/src" -name __pycache__ -prune -exec rm -rf {} +
  cp "$REPO/pyproject.toml" "$ROOT$APP/src/"
}
WHERE_FROM='import platform, sys, bundles, device_agent
print("  ", platform.machine(), "Python", platform.python_version(), "agent from", device_agent.__file__)
sys.exit(0 if platform.machine() == "aarch64" and "site-packages" in bundles.__file__ else 1)'
selection_args() { grep -vE '^\s*(#|$)' "$SELECTION"; }
run_tests() {
  local -a args
  mapfile -t args < <(selection_args)
  # shellcheck disable=SC2206
  local -a extra=(${EDGEFLEET_ARM64_PYTEST_ARGS:-})
  # The code under test must come from the wheel in site-packages, on aarch64.
  in_root_at "$APP/src" "$APP/venv/bin/python" -c "$WHERE_FROM"
  # One fixed --basetemp, emptied by pytest at each run, so the cached root does not grow by a run's temp files.
  rm -rf "$ROOT/tmp/pytest-of-root"
  in_root_at "$APP/src" "$APP/venv/bin/python" -m pytest -q -p no:cacheprovider --junitxml="$APP/junit.xml" \
    --basetemp=/tmp/edgefleet-pytest "${args[@]}" "${extra[@]}"
}

host_tools
timed "register binfmt qemu-aarch64" register_binfmt
build_root
mount_pseudo
timed "carry the host's pip configuration and CA certificates" carry_pip_config
timed "build the wheel (host)" build_wheel
install_agent
copy_tests
log "running the agent's test subset under emulation"
status=0
timed "pytest: the agent's test subset (emulated)" run_tests || status=$?
cp "$ROOT$APP/junit.xml" "$REPO/build/arm64-junit.xml" 2>/dev/null || true
unmount_all
echo
echo "check-arm64: timings (root cached at $ROOT, $(du -sh --one-file-system "$ROOT" | cut -f1))"
printf '  %s\n' "${TIMINGS[@]}"
printf '  %-60s %5ss\n' "total" "$(( $(date +%s) - T0 ))"
(( status == 0 )) && echo "check-arm64: passed (junit: build/arm64-junit.xml)" || echo "check-arm64: FAILED (exit $status)"
exit "$status"
