"""Feature extraction beside the plain timm loop: images/s and ratios, measured side by side in one run.

Loops over the same images (MSRC-v2 by default, short side 224 px, batches of up to 32 images of one
shape):

- plain timm fp32: decode (PIL) + resize + normalise + ``forward_features`` under ``inference_mode``;
- plain timm bf16: the same under ``torch.autocast("cpu", dtype=torch.bfloat16)``;
- ussbench fp32 / ussbench auto: ``backbone.extract(dataset)`` with ``precision`` fp32 / auto (tokens,
  keys, CLS, CLS attention, float16 storage);
- ussbench auto, decode thread: the same with decoding in one background thread (the default decodes in
  the calling thread on the CPU, see ``ussbench.threads.decode_workers``);
- ``--before DIR``: another checkout's ``extract`` on the same images (a subprocess; e.g. /work/main).

Two measurements: ``--rounds`` short rounds, each loop over one batch of ``--batch-size`` images of the
most common shape, the loops' order rotated every round and the best round kept (a shared machine only
slows rounds down, so the best round is the closest to the machine's speed); then one pass per loop over
the first ``--limit`` images (0: all) of mixed shapes, as a grid run sees them.

Targets (issue 16): ussbench fp32 >= 0.95x plain fp32; ussbench auto >= 2x plain fp32 where the CPU has
bf16. Run with both cores free: ``scripts/cpujob --both .venv/bin/python benchmarks/perf/extract.py``.

    python benchmarks/perf/extract.py [--rounds 6] [--limit 0] [--dataset msrc_v2|camvid] [--json F]
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


class Subset:
    """Some images of a dataset, as ``Backbone.extract`` reads a dataset (ids, load_image, len)."""

    def __init__(self, ds, indices: list[int]):
        self.ds, self.indices = ds, indices

    def __len__(self) -> int:
        return len(self.indices)

    def ids(self) -> list[str]:
        ids = self.ds.ids()
        return [ids[i] for i in self.indices]

    def load_image(self, i: int) -> np.ndarray:
        return self.ds.load_image(self.indices[i])

    def paths(self) -> list[Path]:
        files = self.ds._files()
        return [files[i][1] for i in self.indices]


def one_shape_batch(ds, n: int) -> Subset:
    """The first ``n`` images of the dataset's most common size."""
    sizes: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, (_, path, _) in enumerate(ds._files()):
        with Image.open(path) as im:
            sizes[im.size].append(i)
    members = max(sizes.values(), key=len)
    return Subset(ds, members[:n])


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
    """ussbench's extraction of the whole dataset (optionally with a given number of decode threads)."""

    def __init__(self, ds, precision: str, decode_threads: int | None = None):
        spec = registry.get("backbone", "dinov2_vits14_imgfocus")
        cache = str(ROOT / ".cache" / "ussbench")
        self.backbone = registry.instantiate(
            spec, {"cache_dir": cache, "precision": precision, "device": "cpu"}
        )
        self.backbone.model(torch.device("cpu"))
        self.ds, self.decode_threads = ds, decode_threads

    def __call__(self) -> int:
        saved = vit_module.decode_workers
        if self.decode_threads is not None:
            vit_module.decode_workers = lambda device, n=self.decode_threads: n
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
    env = {
        **os.environ,
        "PYTHONPATH": str(checkout),
    }  # run in the checkout: '-c' puts the cwd first on sys.path
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=checkout, capture_output=True, text=True,
                         check=True)  # fmt: skip
    return float(out.stdout.strip().splitlines()[-1])


def breakdown(backbone, batch: torch.Tensor) -> list[str]:
    """Where one forward's time goes per precision: linear layers, attention, the rest; their GFLOP/s."""
    from torch.profiler import ProfilerActivity, profile

    from ussbench.reports.machine_limits import measure_limits

    model = backbone.model(torch.device("cpu"))
    vit = model.vit
    n, t = batch.shape[0], (batch.shape[2] // 14) * (batch.shape[3] // 14) + 1
    d, depth, mlp = int(vit.embed_dim), len(vit.blocks), int(vit.blocks[0].mlp.fc1.out_features)
    linear_gflop = n * depth * (2 * t * d * 4 * d + 4 * t * d * mlp) / 1e9
    attention_gflop = n * depth * 4 * t * t * d / 1e9
    limits = measure_limits()
    lines = [
        f"one forward of {n} images ({t} tokens each); machine: fp32 matmul {limits.fp32_gflops:.0f} GFLOP/s, "
        f"bf16 {limits.bf16_gflops:.0f} GFLOP/s",
        "",
        "| precision | total s | linear s (GFLOP/s, of matmul limit) | attention s (GFLOP/s) | other s |",
        "|---|---|---|---|---|",
    ]
    saved = model.precision
    for precision in ("fp32", "bf16"):
        model.precision = precision
        model(batch)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(batch)
        parts = {"linear": 0.0, "attention": 0.0, "other": 0.0}
        for event in prof.key_averages():
            key = event.key
            part = (
                "linear"
                if key in ("aten::addmm", "aten::mm")
                else "attention"
                if "dot_product" in key
                else "other"
            )
            parts[part] += event.self_cpu_time_total / 1e6
        total = sum(parts.values())  # an op's self time is its wall time on the calling thread
        lin, att, other = (parts[k] for k in ("linear", "attention", "other"))
        limit = limits.bf16_gflops if precision == "bf16" else limits.fp32_gflops
        lines.append(
            f"| {precision} | {total:.2f} | {lin:.2f} ({linear_gflop / lin:.0f}, {linear_gflop / lin / limit:.0%}) | "
            f"{att:.2f} ({attention_gflop / att:.0f}) | {other:.2f} |"
        )
    model.precision = saved
    return lines


def measure(loops: dict, rounds: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """images/s of every loop in each round (wall clock, and per CPU-second of this process x threads),
    the loops' order rotated from round to round.

    The CPU-time rate counts only the time this process ran: on a machine shared with others it stays
    close to the quiet machine's speed when the wall clock does not (both agree on a quiet machine).
    """
    names = list(loops)
    for loop in loops.values():  # warm up: kernels, pages, pos-embed caches
        loop()
    wall: dict[str, list[float]] = {name: [] for name in names}
    cpu: dict[str, list[float]] = {name: [] for name in names}
    threads = torch.get_num_threads()
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            start, start_cpu = time.perf_counter(), time.process_time()
            n = loops[name]()
            wall[name].append(n / (time.perf_counter() - start))
            cpu[name].append(n * threads / (time.process_time() - start_cpu))
    return wall, cpu


def make_loops(subset: Subset, state: dict, batch_size: int, thread: bool) -> dict:
    loops = {
        "plain timm fp32": PlainLoop(state, subset.paths(), batch_size, bf16=False),
        "plain timm bf16 autocast": PlainLoop(state, subset.paths(), batch_size, bf16=True),
        "ussbench fp32": HarnessLoop(subset, "fp32"),
        "ussbench auto": HarnessLoop(subset, "auto"),
    }
    if thread:
        loops["ussbench auto, decode thread"] = HarnessLoop(subset, "auto", decode_threads=1)
    return loops


def table(rates: dict[str, list[float]], loops: dict) -> list[str]:
    best = {name: max(v) for name, v in rates.items()}
    ref32, ref16 = best["plain timm fp32"], best["plain timm bf16 autocast"]
    lines = ["| loop | images/s (best) | all rounds | x plain fp32 | x plain bf16 |", "|---|---|---|---|---|"]
    for name, value in best.items():
        spread = " ".join(f"{v:.1f}" for v in rates[name])
        loop = loops.get(name)
        label = name + (f" (resolved {loop.precision})" if getattr(loop, "precision", None) else "")
        lines.append(f"| {label} | {value:.2f} | {spread} | {value / ref32:.2f} | {value / ref16:.2f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dataset", choices=sorted(DATASETS), default="msrc_v2")
    parser.add_argument("--rounds", type=int, default=6, help="short rounds over one batch of one shape")
    parser.add_argument("--limit", type=int, default=0, help="images of the full pass (0: all, -1: no pass)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--no-thread", action="store_true", help="skip the decode-thread variant")
    parser.add_argument("--before", type=Path, help="another checkout to time the same way (subprocess)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    print(f"machine: {describe_machine()}; native bf16: {cpu_has_native_bf16()}")
    print("load average before: {:.2f} {:.2f} {:.2f}".format(*load_average()))
    full = dataset(args.dataset, None)
    state = HarnessLoop(Subset(full, [0]), "fp32").backbone.state_dict_for_model()
    report: dict = {"machine": describe_machine()}
    batch = one_shape_batch(full, args.batch_size)
    loops = make_loops(batch, state, args.batch_size, not args.no_thread)
    rates, cpu_rates = measure(loops, args.rounds)
    shape = tuple(loops["ussbench fp32"].backbone.preprocess(batch.load_image(0)).shape[1:])
    print(f"\n{args.rounds} rounds over one batch of {len(batch)} {args.dataset} images of one size "
          f"(input {shape[0]}x{shape[1]}), wall clock:\n")  # fmt: skip
    print("\n".join(table(rates, loops)))
    print(f"\nthe same rounds per CPU-second of this process x {torch.get_num_threads()} threads:\n")
    print("\n".join(table(cpu_rates, loops)))
    report["rounds"], report["rounds_cpu"] = rates, cpu_rates
    backbone = loops["ussbench fp32"].backbone
    inputs = torch.stack([backbone.preprocess(batch.load_image(i)) for i in range(len(batch))])
    print("\nwhere the time of one forward goes (torch profiler, self time of each op):\n")
    print("\n".join(breakdown(backbone, inputs)))
    best = {name: max(v) for name, v in rates.items()}
    best_cpu = {name: max(v) for name, v in cpu_rates.items()}
    if args.limit >= 0:
        n = args.limit or len(full)
        whole = Subset(full, list(range(min(n, len(full)))))
        loops_full = make_loops(whole, state, args.batch_size, not args.no_thread)
        rates_full, _ = measure(loops_full, 1)
        if args.before:
            rates_full[f"before: {args.before}"] = [before_checkout(args.before, args.dataset, len(whole))]
        print(f"\none pass over {len(whole)} {args.dataset} images of mixed sizes:\n")
        print("\n".join(table(rates_full, loops_full)))
        report["full_pass"] = rates_full
    print("\nload average after: {:.2f} {:.2f} {:.2f}".format(*load_average()))
    for what, rates_of in (("wall clock", best), ("CPU time", best_cpu)):
        ref32 = rates_of["plain timm fp32"]
        fp32_ratio, auto_ratio = rates_of["ussbench fp32"] / ref32, rates_of["ussbench auto"] / ref32
        print(f"\n{what}: target ussbench fp32 >= 0.95x plain fp32: {fp32_ratio:.2f}x "
              f"({'met' if fp32_ratio >= 0.95 else 'NOT met'})")  # fmt: skip
        if cpu_has_native_bf16():
            print(f"{what}: target ussbench auto >= 2x plain fp32: {auto_ratio:.2f}x "
                  f"({'met' if auto_ratio >= 2 else 'NOT met'})")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
