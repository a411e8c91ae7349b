"""Feature extraction beside the plain timm loop: images/s and ratios, measured side by side in one run.

Loops, each over the same images (MSRC-v2 by default, short side 224 px, batches of up to 32 images of
one shape), interleaved over ``--repeats`` rounds, best round reported (a shared machine only slows a
round down):

- plain timm fp32: decode (PIL) + resize + normalise + ``forward_features`` under ``inference_mode``;
- plain timm bf16: the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``;
- ussbench fp32 / ussbench auto: ``backbone.extract(dataset)`` with ``precision`` fp32 / auto (tokens,
  keys, CLS, CLS attention, float16 storage; decoding in a background thread);
- ussbench auto, decode inline: the same without the decode thread (``--no-inline`` skips it);
- ``--before DIR``: another checkout's ``extract`` on the same images (a subprocess; e.g. /work/main).

Targets (issue 16): ussbench fp32 >= 0.95x plain fp32; ussbench auto >= 2x plain fp32 where the CPU has
bf16. Run with both cores free: ``/work/bin/cpujob --both .venv/bin/python benchmarks/perf/extract.py``.

    python benchmarks/perf/extract.py [--limit 128] [--repeats 3] [--dataset msrc_v2|camvid] [--json F]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from ussbench import registry  # noqa: E402
from ussbench.backbones import vit as vit_module  # noqa: E402
from ussbench.backbones.precision import cpu_has_native_bf16  # noqa: E402
from ussbench.backbones.vit import IMAGENET_MEAN, IMAGENET_STD, target_size  # noqa: E402
from ussbench.reports.machine_limits import describe_machine, load_average  # noqa: E402

DATASETS = {"msrc_v2": {"classes": 21}, "camvid": {}}


def dataset(name: str, limit: int | None):
    spec = registry.get("dataset", name)
    return registry.instantiate(spec, {**DATASETS[name], "data_root": str(ROOT / "data"), "limit": limit})


def image_paths(ds) -> list[Path]:
    return [path for _, path, _ in ds._files()]


class PlainLoop:
    """The reference: timm ``forward_features`` over batches of one shape, decode and resize included."""

    def __init__(self, state: dict[str, torch.Tensor], paths: list[Path], batch_size: int, bf16: bool):
        self.vit = timm.create_model(
            "vit_small_patch14_dinov2", pretrained=False, num_classes=0, img_size=518, dynamic_img_size=True
        )
        self.vit.load_state_dict(state)
        self.vit.eval()
        self.paths, self.bf16 = paths, bf16
        groups: dict[tuple[int, int], list[Path]] = defaultdict(list)
        for path in paths:
            with Image.open(path) as im:
                w, h = im.size
            groups[target_size(h, w, 224, 14)].append(path)
        self.batches = [(size, members[s : s + batch_size]) for size, members in groups.items()
                        for s in range(0, len(members), batch_size)]  # fmt: skip
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def load(self, path: Path, size: tuple[int, int]) -> torch.Tensor:
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB")).copy()
        t = torch.from_numpy(array).permute(2, 0, 1).float().div_(255.0)[None]
        t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)
        return ((t - self.mean) / self.std)[0]

    def __call__(self) -> int:
        for size, members in self.batches:
            x = torch.stack([self.load(p, size) for p in members])
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                self.vit.forward_features(x)
        return len(self.paths)


class HarnessLoop:
    """ussbench's extraction of the whole dataset (optionally with decoding in the caller's thread)."""

    def __init__(self, ds, precision: str, inline_decode: bool = False):
        spec = registry.get("backbone", "dinov2_vits14_imgfocus")
        cache = str(ROOT / ".cache" / "ussbench")
        self.backbone = registry.instantiate(
            spec, {"cache_dir": cache, "precision": precision, "device": "cpu"}
        )
        self.backbone.model(torch.device("cpu"))
        self.ds, self.inline = ds, inline_decode

    def __call__(self) -> int:
        saved = vit_module.decode_workers
        if self.inline:
            vit_module.decode_workers = lambda: 0
        try:
            feats = self.backbone.extract(self.ds, torch.device("cpu"), progress=False)
        finally:
            vit_module.decode_workers = saved
        self.precision = feats.meta["precision"]
        return len(feats)


def before_checkout(checkout: Path, name: str, limit: int | None) -> float:
    """images/s of another checkout's extraction (fp32 there: it has no precision parameter) in a subprocess."""
    code = (
        "import time, torch\nfrom ussbench import registry\n"
        f"ds = registry.instantiate(registry.get('dataset', {name!r}), {{**{DATASETS[name]!r}, "
        f"'data_root': {str(ROOT / 'data')!r}, 'limit': {limit!r}}})\n"
        "bb = registry.instantiate(registry.get('backbone', 'dinov2_vits14_imgfocus'), "
        f"{{'cache_dir': {str(ROOT / '.cache' / 'ussbench')!r}}})\n"
        "bb.model(torch.device('cpu'))\nt = time.perf_counter()\n"
        "bb.extract(ds, torch.device('cpu'), progress=False)\nprint(len(ds) / (time.perf_counter() - t))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="msrc_v2")
    parser.add_argument("--limit", type=int, default=128, help="first N images (0: all)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-inline", action="store_true", help="skip the inline-decode variant")
    parser.add_argument("--before", type=Path, help="another checkout to time the same way (subprocess)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    limit = args.limit or None
    ds = dataset(args.dataset, limit)
    paths = image_paths(ds)
    print(f"machine: {describe_machine()}; native bf16: {cpu_has_native_bf16()}")
    print(f"data: {args.dataset}, {len(paths)} images, 224 px short side, batches of <= {args.batch_size}")
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*load_average()))
    harness_fp32 = HarnessLoop(ds, "fp32")
    state = harness_fp32.backbone.state_dict_for_model()
    loops = {
        "plain timm fp32": PlainLoop(state, paths, args.batch_size, bf16=False),
        "plain timm bf16 autocast": PlainLoop(state, paths, args.batch_size, bf16=True),
        "ussbench fp32": harness_fp32,
        "ussbench auto": HarnessLoop(ds, "auto"),
    }
    if not args.no_inline:
        loops["ussbench auto, decode inline"] = HarnessLoop(ds, "auto", inline_decode=True)
    for loop in loops.values():  # warm up: kernels, pages, pos-embed caches
        loop()
    rounds: dict[str, list[float]] = {name: [] for name in loops}
    for _ in range(args.repeats):
        for name, loop in loops.items():
            start = time.perf_counter()
            n = loop()
            rounds[name].append(n / (time.perf_counter() - start))
    if args.before:
        rounds[f"before: {args.before}"] = [before_checkout(args.before, args.dataset, limit)]
    print("load average after: {:.2f} {:.2f} {:.2f}".format(*load_average()))
    best = {name: max(v) for name, v in rounds.items()}
    ref32, ref16 = best["plain timm fp32"], best["plain timm bf16 autocast"]
    print(f"\n| loop | images/s (best of {args.repeats}) | rounds | x plain fp32 | x plain bf16 |")
    print("|---|---|---|---|---|")
    for name, value in best.items():
        spread = " ".join(f"{v:.1f}" for v in rounds[name])
        label = name + (f" (resolved {loops[name].precision})" if name.startswith("ussbench auto") else "")
        print(f"| {label} | {value:.2f} | {spread} | {value / ref32:.2f} | {value / ref16:.2f} |")
    fp32_ratio, auto_ratio = best["ussbench fp32"] / ref32, best["ussbench auto"] / ref32
    print(f"\ntarget ussbench fp32 >= 0.95x plain fp32: {fp32_ratio:.2f}x "
          f"({'met' if fp32_ratio >= 0.95 else 'NOT met'})")  # fmt: skip
    if cpu_has_native_bf16():
        print(
            f"target ussbench auto >= 2x plain fp32: {auto_ratio:.2f}x ({'met' if auto_ratio >= 2 else 'NOT met'})"
        )
    if args.json:
        args.json.write_text(
            json.dumps({"machine": describe_machine(), "rounds": rounds, "best": best}, indent=1)
        )


if __name__ == "__main__":
    main()
