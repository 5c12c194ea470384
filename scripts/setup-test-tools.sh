#!/usr/bin/env bash
# Installs the clients the API tests drive the gateway with (they are not ours on purpose):
# the official `openai` package and grpcio in a venv at .venv-test, and a headless Chromium
# for the status-page test. Each step is skipped when what it installs is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium-headless-shell >/dev/null 2>&1 && ! command -v chromium >/dev/null 2>&1; then
  echo "installing chromium-headless-shell (Debian package)"
  sudo=""
  if [ "$(id -u)" != 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "error: need root (or sudo) to apt-get install chromium-headless-shell" >&2; exit 1; }
    sudo="sudo"
  fi
  export DEBIAN_FRONTEND=noninteractive
  $sudo apt-get install -y -qq chromium-headless-shell >/dev/null 2>&1 \
    || { $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium-headless-shell >/dev/null; }
fi

req=cli/tests/python/requirements.txt
stamp=.venv-test/.requirements
if [ -x .venv-test/bin/python ] && cmp -s "$req" "$stamp"; then
  exit 0
fi
echo "installing the Python test clients into .venv-test"
python3 -m venv .venv-test
.venv-test/bin/pip install --quiet --disable-pip-version-check -r "$req"
cp "$req" "$stamp"
