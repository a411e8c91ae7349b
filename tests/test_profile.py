"""Stage profiles: the ViT FLOP model against torch's FLOP counter, shared stages counted once, the footer."""

from __future__ import annotations

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode

from ussbench.backbones.vit import ViTExtractor
from ussbench.reports.profile import (
    format_table,
    profile_footer,
    profile_records,
    summarise,
    vit_gflops,
    write_profile,
)


def test_vit_flop_model_matches_torch_flop_counter():
    torch.manual_seed(0)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, depth=2).eval()
    for block in vit.blocks:  # explicit matmuls: torch's counter does not count the fused CPU attention
        block.attn.fused_attn = False
    ex = ViTExtractor(vit)
    x = torch.randn(3, 3, 96, 160)
    with FlopCounterMode(display=False) as counter:
        ex(x)
    counted = counter.get_total_flops() / 1e9
    model = vit_gflops([6 * 10] * 3, 384, 2, 1536, 16)
    assert abs(counted - model) / model < 0.01  # the CLS-attention row is the only uncounted matmul


def cell(cid, ic, dc, seed, t_feat=10.0, t_ic=4.0, t_dc=1.0):
    row = {"cell_id": cid, "dataset": "d", "backbone": "b", "feature_learner": "none", "image_clusterer": ic,
           "dataset_clusterer": dc, "seed": seed, "precision": "fp32", "backbone_gflops": 100.0, "n_tokens": 1000,
           "tokens_sq": 1000 * 100.0, "tokens_cube": 1000 * 1e4, "embed_dim": 64, "vector_dim": 64,
           "n_segments": 500, "n_clusters": 5, "n_pixels": 10**6, "upsample": "nearest_labels",
           "time_features_s": t_feat, "time_image_clusterer_s": t_ic, "time_dataset_clusterer_s": t_dc,
           "time_eval_s": 0.1, "time_nfcov_s": 0.5}  # fmt: skip
    params = {"image_clusterer": {"name": "kmeans_per_image", "params": {"n_segments": 8, "n_init": 1, "max_iter": 10}},
              "dataset_clusterer": {"name": "kmeans", "params": {"n_clusters": 5, "n_init": 2, "max_iter": 10}}}  # fmt: skip
    return {"row": row, "params": params, "class_names": ["a", "b", "c"]}


def test_shared_stages_count_once_and_fractions_use_the_limits(tmp_path):
    cells = [cell("c1", "km", "k-means", 0), cell("c2", "km", "OTC", 0), cell("c3", "km", "k-means", 1)]
    limits = {"fp32_gflops": 100.0, "bf16_gflops": 200.0, "bandwidth_gbs": 10.0, "machine": "test"}
    records = profile_records(cells, limits)
    stages = [(r["stage"], r["cell_id"]) for r in records]
    assert stages.count(("features", "c1")) == 1 and ("features", "c2") not in stages  # one extraction
    assert ("image_clusterer", "c3") in stages and ("image_clusterer", "c2") not in stages  # per seed
    assert sum(1 for s, _ in stages if s == "dataset_clusterer") == 3  # every cell
    assert [c for s, c in stages if s == "nfcovering"] == ["c1", "c3"]  # one per segmentation (graph node)
    feat = next(r for r in records if r["stage"] == "features")
    assert feat["rate"] == 10.0 and feat["fraction"] == 0.1  # 100 GFLOP in 10 s on a 100 GFLOP/s machine
    km = next(r for r in records if r["stage"] == "dataset_clusterer" and r["cell_id"] == "c1")
    assert km["work"] == 2 * 11 * 2 * 500 * 5 * 64 / 1e9 and km["bound"] == "<="  # auto (Elkan) skips work
    faiss_cell = cell("c4", "km", "k-means", 2)
    faiss_cell["params"]["dataset_clusterer"]["params"]["engine"] = "faiss"
    km = next(r for r in profile_records([faiss_cell], limits) if r["stage"] == "dataset_clusterer")
    assert km["bound"] == "="  # faiss runs every iteration
    summary = summarise(records)
    assert summary[0]["stage"] == "features"  # sorted by seconds
    table = "\n".join(format_table(summary))
    assert "(below 20%)" in table and "features" in table
    write_profile(tmp_path, limits, {"report_s": 1.5})
    footer = profile_footer(tmp_path, cells)
    assert (
        "## Where the time goes" in footer
        and "fp32 matmul 100 GFLOP/s" in footer
        and "report build of the profiled run (`benchmarks/perf/profile_grid.py`): 1.5 s" in footer
    )


def test_a_shared_stage_is_timed_by_the_cell_that_computed_it_and_cached_features_get_no_rate():
    """The cell that loaded a shared stage (0.3 s) must not stand for its computation (10 s): a rate from a
    load would exceed any machine's limit (the omh report showed 2.4e4 GFLOP/s for cached features)."""
    limits = {"fp32_gflops": 100.0, "bf16_gflops": 200.0, "bandwidth_gbs": 10.0, "machine": "test"}
    loaded, computed = cell("c1", "km", "k-means", 0, t_feat=0.3), cell("c2", "km", "OTC", 0, t_feat=10.0)
    feat = next(r for r in profile_records([loaded, computed], limits) if r["stage"] == "features")
    assert feat["seconds"] == 10.0 and feat["rate"] == 10.0  # 100 GFLOP in 10 s, not in 0.3 s
    loaded["row"]["features_reused"] = True
    computed["row"]["features_reused"] = True  # a warm-cache run: every cell loaded the features
    feat = next(r for r in profile_records([loaded, computed], limits) if r["stage"] == "features")
    assert "rate" not in feat and "fraction" not in feat and feat["seconds"] == 10.0
    table = "\n".join(format_table(summarise(profile_records([loaded, computed], limits))))
    assert "loaded from the cache" in next(
        line for line in table.splitlines() if line.startswith("| features")
    )


def test_footer_without_limits_shows_seconds_only(tmp_path):
    footer = profile_footer(tmp_path, [cell("c1", "km", "k-means", 0)])
    assert "Limits not measured" in footer and "GFLOP/s |" not in footer.split("\n")[-2]


def test_acg_and_hsg_groups_have_work_models_that_scale_with_their_epochs():
    """ACG and HSG groups are profiled against the limit too: GFLOP grow as (3 x epochs + 1) passes."""
    from ussbench.reports.profile import _image_clusterer

    base = cell("c1", "ACG", "k-means", 0)["row"] | {"n_images": 10}
    for name in ("acg", "hsg_groups"):
        works = []
        for epochs in (1, 3):
            params = {"image_clusterer": {"name": name, "params": {"epochs": epochs}}}
            works.append(_image_clusterer(base, {"params": params}))
        assert all(w is not None and w.unit == "GFLOP" and w.amount > 0 for w in works), name
        assert works[1].amount > 2 * works[0].amount, name  # 10 vs 4 training passes (plus fixed work)


def test_bf16_stages_are_measured_against_the_bf16_limit():
    """ACG and ABC run their matmuls in bf16 where the backbone's 'auto' chose bf16: their limit is bf16's."""
    from ussbench.reports.profile import _dataset_clusterer, _image_clusterer, limit_of

    limits = {"fp32_gflops": 100.0, "bf16_gflops": 200.0, "bandwidth_gbs": 10.0}
    row = cell("c1", "ACG", "ABC", 0)["row"] | {"n_images": 10, "precision": "bf16"}
    acg = _image_clusterer(row, {"params": {"image_clusterer": {"name": "acg", "params": {}}}})
    abc = _dataset_clusterer(row, {"params": {"dataset_clusterer": {"name": "abc", "params": {}}}})
    fp32_abc = _dataset_clusterer(
        row, {"params": {"dataset_clusterer": {"name": "abc", "params": {"precision": "fp32"}}}}
    )
    assert limit_of(acg, row, limits, "image_clusterer") == 200.0
    assert limit_of(abc, row, limits, "dataset_clusterer") == 200.0
    assert limit_of(fp32_abc, row, limits, "dataset_clusterer") == 100.0
    assert limit_of(abc, row | {"precision": "fp32"}, limits, "dataset_clusterer") == 100.0  # no native bf16


def test_a_learner_every_cell_loaded_from_the_cache_gets_no_rate():
    """Learned codes loaded from a warm cache are a load, like cached features: seconds only, no throughput."""
    limits = {"fp32_gflops": 100.0, "bf16_gflops": 200.0, "bandwidth_gbs": 10.0, "machine": "test"}
    c = cell("c1", "km", "k-means", 0)
    c["row"].update(feature_learner="STEGO", time_feature_learner_s=0.2, learner_reused=True)
    learner = next(r for r in profile_records([c], limits) if r["stage"] == "feature_learner")
    assert learner.get("cached") is True and "rate" not in learner
    c["row"]["learner_reused"] = False
    learner = next(r for r in profile_records([c], limits) if r["stage"] == "feature_learner")
    assert "cached" not in learner


def test_at_equal_seconds_the_cell_that_computed_a_shared_stage_stands_for_it():
    """Cells sharing a stage all carry its first-use seconds; the first cell read may be one that reused it
    from memory, and the cold run's features were then shown as 'loaded from the cache' (new-user check)."""
    limits = {"fp32_gflops": 100.0, "bf16_gflops": 200.0, "bandwidth_gbs": 10.0, "machine": "test"}
    reused, computed = cell("c1", "km", "k-means", 0), cell("c2", "km", "OTC", 0)
    reused["row"]["features_reused"], computed["row"]["features_reused"] = True, False
    for order in ([reused, computed], [computed, reused]):
        feat = next(r for r in profile_records(order, limits) if r["stage"] == "features")
        assert "cached" not in feat and feat["cell_id"] == "c2" and feat["rate"] == 10.0


def test_limits_measured_on_another_cpu_are_not_applied(tmp_path):
    """A report rebuilt on another machine kept the committed profile.json (AMD limits, its wall clock) under
    Intel cells; the footer now says so instead of dividing these cells' seconds by another CPU's limits."""
    limits = {"fp32_gflops": 100.0, "bf16_gflops": 200.0, "bandwidth_gbs": 10.0,
              "machine": "AMD EPYC, 2 usable CPUs (avx2), torch 2 with 2 threads, no GPU"}  # fmt: skip
    write_profile(tmp_path, limits, {"wall_s": 371.8})
    cells = [cell("c1", "km", "k-means", 0)]
    cells[0]["row"]["cpu_model"] = "Intel(R) Xeon(R) Processor"
    footer = profile_footer(tmp_path, cells)
    assert "measured on another CPU (AMD EPYC with avx2)" in footer
    assert "fp32 matmul" not in footer and "371.8" not in footer
    cells[0]["row"]["cpu_model"] = "AMD EPYC"
    footer = profile_footer(tmp_path, cells)
    assert "fp32 matmul 100 GFLOP/s" in footer and "371.8" in footer
    cells[0]["row"]["cpu_isa"] = "avx2 fma"  # the same model and matmul flags (fma is not compared)
    assert "fp32 matmul 100 GFLOP/s" in profile_footer(tmp_path, cells)


def test_limits_of_another_cpu_with_the_same_model_name_are_not_applied(tmp_path):
    """Both an AVX2-only EPYC (Zen 3) and an AVX512-BF16 one (Zen 4) call themselves "AMD EPYC": the committed
    README report's footer showed the Zen 4's limits under cells run on the Zen 3. The ISA tells them apart."""
    limits = {"fp32_gflops": 110.0, "bf16_gflops": 400.0, "bandwidth_gbs": 27.0,
              "machine": "AMD EPYC, 2 usable CPUs (avx2 avx512f avx512_bf16), torch 2 with 2 threads, no GPU"}  # fmt: skip
    write_profile(tmp_path, limits, {"wall_s": 371.8})
    cells = [cell("c1", "km", "k-means", 0)]
    cells[0]["row"] |= {"cpu_model": "AMD EPYC", "cpu_isa": "avx2 fma"}
    footer = profile_footer(tmp_path, cells)
    assert "measured on another CPU (AMD EPYC with avx2 avx512_bf16 avx512f)" in footer
    assert "fp32 matmul" not in footer and "371.8" not in footer
    cells[0]["row"]["cpu_isa"] = "avx2 fma avx512f avx512_bf16 avx512_vnni"
    assert "fp32 matmul 110 GFLOP/s" in profile_footer(tmp_path, cells)
