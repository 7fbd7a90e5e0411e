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
# uv installs the same packages about 3x faster than pip (a fresh install measured 56 s vs 189 s on a 2-core
# machine: PyTorch pulls gigabytes of wheels, which uv fetches in parallel). uv does not read pip's configuration,
# so the index, extra indexes, find-links and constraints pip would use are passed on (pip config + PIP_* vars).
if .venv/bin/python -m pip install --quiet --disable-pip-version-check uv >/dev/null 2>&1; then
  mapfile -t pip_settings < <(.venv/bin/python - <<'PY'
import os, subprocess, sys
flags = {"index-url": "--index-url", "extra-index-url": "--extra-index-url", "find-links": "--find-links",
         "constraint": "--constraint"}
listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True).stdout
seen = set()
for line in listed.splitlines():
    key, _, value = line.partition("=")
    name = key.rpartition(".")[2]
    for item in value.strip().strip("'\"").split():
        # pip skips a local index folder that does not exist (with a warning); uv would stop, so leave it out
        missing = item.startswith("file://") and not os.path.isdir(item.removeprefix("file://"))
        if name in flags and not missing and (name, item) not in seen:
            seen.add((name, item))
            print(flags[name]), print(item)
PY
)
  .venv/bin/python -m uv pip install --quiet --python .venv/bin/python --index-strategy unsafe-best-match \
    "${pip_settings[@]}" -e ".${extras}"
else
  echo "setup: could not install uv; installing with pip instead (about 3x slower)"
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".${extras}"
fi
.venv/bin/kdkit --version
