#!/usr/bin/env bash
# Installs the real third-party programs the tests drive (see ../shared/REAL-PARTS.md):
# the CNCF distribution registry, skopeo, containerd, aria2, opentracker, iproute2, curl, and
# wrk (the load generator of tests/bench/bench_tracker.py), chromium and chromium-driver (the
# agent's status page in a real browser), and promtool (Debian's prometheus package: the chart's
# alert rules are checked and unit-tested with it), and mkfs.ext4 and losetup (a throttled loop
# device is the slow disk of the adaptive download limit's tests, tests/realparts/slowdisk.py), and
# tinyproxy (the egress HTTP proxy of tests/component/test_origin_egress.py).
# Does nothing when they are all present. Needs root (or passwordless sudo) to install.
# With --demo, a missing package that cannot be installed is not fatal: the demo falls
# back to its built-in origin.
set -euo pipefail
demo=0
[ "${1:-}" = "--demo" ] && demo=1

need_pkgs=()
check() { # command package
  command -v "$1" >/dev/null 2>&1 || need_pkgs+=("$2")
}
if [ "$demo" = 1 ]; then
  check docker-registry docker-registry
  check skopeo skopeo
else
  check docker-registry docker-registry
  check htpasswd apache2-utils
  check skopeo skopeo
  check containerd containerd
  check ctr containerd
  check aria2c aria2
  check opentracker opentracker
  check ip iproute2
  check curl curl
  check wrk wrk
  check chromium chromium
  check chromedriver chromium-driver
  check promtool prometheus
  check mkfs.ext4 e2fsprogs
  check losetup mount
  check tinyproxy tinyproxy
fi
[ "${#need_pkgs[@]}" -eq 0 ] && exit 0

mapfile -t pkgs < <(printf '%s\n' "${need_pkgs[@]}" | sort -u)
echo "install-real-parts: installing ${pkgs[*]}" >&2
sudo=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo="sudo -n"
  else
    echo "install-real-parts: need root to apt-get install ${pkgs[*]}" >&2
    [ "$demo" = 1 ] && exit 0
    exit 1
  fi
fi
if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null; }; then
  echo "install-real-parts: apt-get install ${pkgs[*]} failed" >&2
  [ "$demo" = 1 ] && exit 0
  exit 1
fi
