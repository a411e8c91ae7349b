"""Feature learners give bit-identical weights and codes with 1 or 2 CPU threads (docs/reproducibility.md)."""

from __future__ import annotations

import pytest
import torch
from _learner_toys import toy_ctx, toy_features

from ussbench import registry

# 384 channels (the ViT-S width): reductions large enough that torch splits them over threads
FS = toy_features(n=16, channels=384)
PARAMS = dict(num_classes=3, steps=5, batch_size=8, crop_size=8, curve_every=5, checkpoints=0, seed=0)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def _fit(name: str, threads: int) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    torch.set_num_threads(threads)
    learner = registry.get("feature_learner", name).cls(**PARAMS).fit(FS, toy_ctx())
    state = {}
    for attr in learner._snapshot_attrs:
        obj = getattr(learner, attr)
        items = obj.state_dict().items() if isinstance(obj, torch.nn.Module) else [("", obj)]
        state.update({f"{attr}{k}": v.detach().clone() for k, v in items})
    if learner.omh_heads_ is not None:
        state.update({f"omh.{k}": v.clone() for k, v in learner.omh_heads_.state_dict().items()})
    return state, [im.code for im in learner.transform(FS, toy_ctx())]


@pytest.mark.slow
@pytest.mark.parametrize("name", ["stego", "hp", "smooseg", "stego_omh"])
def test_learner_weights_and_codes_do_not_depend_on_the_thread_count(name, restore_threads):
    (w1, c1), (w2, c2) = _fit(name, 1), _fit(name, 2)
    assert w1.keys() == w2.keys()
    for key in w1:
        assert torch.equal(w1[key], w2[key]), f"{name}: {key} differs with 1 vs 2 threads"
    assert all(torch.equal(a, b) for a, b in zip(c1, c2)), f"{name}: codes differ with 1 vs 2 threads"
    assert torch.get_num_threads() == 2  # the learner restored the caller's thread count
