#!/usr/bin/env bash
# Sets up what the console page and its browser tests need:
# - noVNC's core, from the npm package @novnc/novnc pinned in package.json / package-lock.json,
#   into node_modules/ (git-ignored; the proxy serves node_modules/@novnc/novnc/ under /novnc/).
#   Runs `npm ci` (or `npm install` without a lock file) when it is missing or not the pinned version.
# - Debian's chromium, for tests/web/test_page.py (Playwright drives /usr/bin/chromium; no
#   `playwright install`): as root and missing, apt-get update then apt-get install -y.
# - certutil (Debian libnss3-tools), with which the HTTPS page tests make an NSS database that
#   trusts the test CA for chromium (never --ignore-certificate-errors): installed the same way.
# Under CI=true a missing node/npm, chromium or certutil fails the run; elsewhere it is a warning (the
# page tests then skip with the command that installs what is missing).
set -euo pipefail

cd "$(dirname "$0")/.."

ci=false
[ "${CI:-}" = "true" ] && ci=true
problems=()

is_root() { [ "$(id -u)" = 0 ]; }

apt_updated=false
apt_install() {
  if ! is_root || ! command -v apt-get >/dev/null 2>&1; then
    return 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  if [ "$apt_updated" = false ]; then
    apt-get update -qq
    apt_updated=true
  fi
  echo "setup-page: installing $*"
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}

# --- node/npm and noVNC ---------------------------------------------------------------------

if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
  apt_install nodejs npm || true
fi

wanted=$(sed -n 's/.*"@novnc\/novnc": *"\([^"]*\)".*/\1/p' package.json | head -n1)
installed=""
if [ -f node_modules/@novnc/novnc/package.json ]; then
  installed=$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' node_modules/@novnc/novnc/package.json | head -n1)
fi

if [ -n "$wanted" ] && [ "$installed" = "$wanted" ] && [ -f node_modules/@novnc/novnc/core/rfb.js ]; then
  : # up to date
elif command -v npm >/dev/null 2>&1; then
  echo "setup-page: installing @novnc/novnc $wanted (found: ${installed:-none})"
  if [ -f package-lock.json ]; then
    npm ci --no-audit --no-fund --loglevel=error
  else
    npm install --no-audit --no-fund --loglevel=error
  fi
  installed=$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' node_modules/@novnc/novnc/package.json | head -n1)
  if [ "$installed" != "$wanted" ]; then
    problems+=("@novnc/novnc is $installed after npm, expected $wanted")
  fi
else
  problems+=("node/npm (apt-get install nodejs npm) to install @novnc/novnc $wanted")
fi

# --- chromium -----------------------------------------------------------------------------

if ! [ -x /usr/bin/chromium ]; then
  apt_install chromium || true
fi
if ! [ -x /usr/bin/chromium ]; then
  problems+=("chromium (apt-get install chromium) for the browser tests")
fi

# --- certutil (NSS tools), for the HTTPS page tests ----------------------------------------

if ! command -v certutil >/dev/null 2>&1; then
  apt_install libnss3-tools || true
fi
if ! command -v certutil >/dev/null 2>&1; then
  problems+=("certutil (apt-get install libnss3-tools) for the HTTPS browser tests")
fi

# A Korean font, so that screenshots in tests/artifacts/ show Hangul instead of boxes (optional:
# the tests read the text from the DOM; users' browsers bring their own fonts).
if command -v fc-list >/dev/null 2>&1 && [ -z "$(fc-list :lang=ko 2>/dev/null | head -n1)" ]; then
  apt_install fonts-nanum || echo "setup-page: note: no Korean font; screenshots show boxes for Hangul" >&2
fi

if [ ${#problems[@]} -gt 0 ]; then
  for p in "${problems[@]}"; do
    echo "setup-page: missing: $p" >&2
  done
  if [ "$ci" = true ]; then
    echo "setup-page: CI=true and the page's dependencies are missing" >&2
    exit 1
  fi
  echo "setup-page: warning: the page tests will be skipped (they fail under CI=true)" >&2
fi
exit 0
