#!/usr/bin/env bash
# Install kdkit into ./.venv; with "dev", also the test and lint tools.
# Where apt is available (and we are root), also installs the Fashion-MNIST idx files the demo uses
# (/usr/share/datasets/fashion-mnist); without them the demo says so and uses scikit-learn's digits.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
[ "${1:-}" = "dev" ] && extras="[dev]"

if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "setup: installing dataset-fashion-mnist with apt-get"
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } \
      >/tmp/kdkit-apt.log 2>&1; then
    echo "setup: could not install dataset-fashion-mnist (see /tmp/kdkit-apt.log); the demo will use digits"
  fi
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
echo "setup: installing kdkit${extras} into .venv (PyTorch is the large part)"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras}"
.venv/bin/kdkit --version
