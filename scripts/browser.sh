#!/usr/bin/env bash
# Headless Chromium for the browser test of the MLflow dashboard (tests/test_browser.py):
# Debian's `chromium`, driven by Playwright from PyPI (no browser download; see
# windtunnel/tracking/browser.py). Idempotent, and never fails the install: where the browser
# cannot be installed it prints one line and the browser test skips (fails in CI).
set -uo pipefail
CHROMIUM=${WINDTUNNEL_CHROMIUM:-/usr/bin/chromium}
note() { echo "install: $*" >&2; }

[ -x "$CHROMIUM" ] && exit 0
if [ -n "${WINDTUNNEL_CHROMIUM:-}" ]; then
  note "WINDTUNNEL_CHROMIUM=$CHROMIUM is not executable; the browser test will skip"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  note "no $CHROMIUM and no apt-get: install Chromium and set WINDTUNNEL_CHROMIUM for the browser test"
  exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
  sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
  sudo=(sudo -n)
else
  note "no $CHROMIUM: run \`sudo apt-get install chromium\` for the browser test (it skips without)"
  exit 0
fi
apt=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get -y -q)
note "installing Debian's chromium for the browser test"
if ! "${apt[@]}" install chromium >/dev/null 2>&1; then
  "${apt[@]}" update >/dev/null 2>&1 || true
  "${apt[@]}" install chromium >/dev/null 2>&1 || true
fi
if [ -x "$CHROMIUM" ]; then
  note "chromium $("$CHROMIUM" --version 2>/dev/null | awk '{print $2}') installed"
else
  note "apt-get could not install chromium (offline?); the browser test will skip"
fi
exit 0
