"""ACG's fast paths compute the same function as the direct forms: the cross-attention folded through the
prototypes, the fused pixel-attention and max-intensity kernels (numba) and the small self-attention."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ussbench.image_clusterers import _modularity, _pixel_attention
from ussbench.image_clusterers.acg import (
    ConceptGenerator,
    folded_self_attention,
    self_attention,
    self_attention_folds,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _randomised(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter drawn at random (LayerNorm gains and biases included), so no term vanishes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(
                0.3 * torch.randn(p.shape, generator=g) + (1.0 if p.ndim == 1 and p.shape[0] % 7 else 0.0)
            )
    return model


@pytest.mark.parametrize("heads", [1, 2])
def test_folded_cross_attention_equals_the_direct_form(heads):
    model = _randomised(ConceptGenerator(dim=16, n_prototypes=3, n_rounds=2, n_heads=heads, ffn_dim=24), 1)
    x = torch.randn(4, 10, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(model(x), model.forward_reference(x), atol=2e-4, rtol=2e-4)
    # gradients too (the folds are differentiable functions of the same parameters)
    model(x).square().sum().backward()
    fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.forward_reference(x).square().sum().backward()
    for a, p in zip(fast, model.parameters()):
        torch.testing.assert_close(a, p.grad, atol=2e-3, rtol=2e-3)


def test_self_attention_equals_multihead_attention():
    mha = _randomised(torch.nn.MultiheadAttention(12, 3, batch_first=True), 3)
    p = torch.randn(5, 6, 12, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(
        self_attention(p, mha), mha(p, p, p, need_weights=False)[0], atol=1e-5, rtol=1e-5
    )


def test_folded_self_attention_equals_the_four_projections_in_value_and_gradient():
    mha = _randomised(torch.nn.MultiheadAttention(12, 1, batch_first=True), 5)
    p = torch.randn(5, 6, 12, generator=torch.Generator().manual_seed(6), requires_grad=True)
    folded = folded_self_attention(p, self_attention_folds(mha))
    direct = mha(p, p, p, need_weights=False)[0]
    torch.testing.assert_close(folded, direct, atol=1e-5, rtol=1e-5)
    w = torch.randn(direct.shape, generator=torch.Generator().manual_seed(7))
    grads = [torch.autograd.grad((out * w).sum(), [p, *mha.parameters()]) for out in (folded, direct)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    # several heads: folding would cost more than it saves, so there is none
    assert self_attention_folds(torch.nn.MultiheadAttention(12, 3, batch_first=True)) is None


@pytest.mark.skipif(_pixel_attention.numba is None, reason="numba not installed")
def test_pixel_attention_kernel_equals_torch():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 37, 20, generator=g)
    q = torch.randn(3, 4, 20, generator=g, requires_grad=True)
    w = torch.randn(3, 4, 20, generator=g)
    out = _pixel_attention.pixel_attention(q, x)
    (out * w).sum().backward()
    q2 = q.detach().clone().requires_grad_(True)
    ref = (q2 @ x.transpose(1, 2)).softmax(-1) @ x
    (ref * w).sum().backward()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.grad, q2.grad, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(_modularity.numba is None, reason="numba not installed")
def test_max_intensity_kernel_equals_the_torch_path():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(3, 29, 8, generator=g)
    graph = _modularity.modularity_graph(x)
    St = torch.rand(3, 5, 29, generator=g)  # concept-major (B, N, P)
    q_fast, h_fast = _modularity._max_intensity_numba(St, graph)
    q_ref, h_ref = _modularity._max_intensity_torch(St, graph)
    torch.testing.assert_close(q_fast, q_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(h_fast, h_ref, atol=1e-6, rtol=1e-5)
    assert q_ref.abs().min() > 1e-4  # a non-trivial value
    # H is half the gradient of q, by autograd through the (N, P, P) products
    S = St.clone().requires_grad_()
    q_auto = (graph * (S.unsqueeze(3) * S.unsqueeze(2)).amax(1)).sum((1, 2))
    q_auto.sum().backward()
    torch.testing.assert_close(q_auto.detach(), q_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(S.grad, 2 * h_ref, atol=1e-5, rtol=1e-5)


def test_max_intensity_torch_path_is_the_same_in_any_chunking():
    """The GPU path batches images in chunks (a few kernels per chunk, not per image): one image per chunk, two,
    or all of them give the same q and H, padded images included."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(5, 23, 8, generator=g)
    x[1, 17:] = 0  # a padded image: its padding rows of the graph are zero
    graph = _modularity.modularity_graph(x)
    graph[1, 17:], graph[1, :, 17:] = 0, 0
    St = torch.rand(5, 4, 23, generator=g)
    per_image = 4 * 23 * 23 * St.element_size()
    q_all, h_all = _modularity._max_intensity_torch(St, graph)
    for chunk in (1, 2 * per_image, 3 * per_image):
        q, h = _modularity._max_intensity_torch(St, graph, chunk_bytes=chunk)
        torch.testing.assert_close(q, q_all, atol=0, rtol=0)
        torch.testing.assert_close(h, h_all, atol=0, rtol=0)
    assert h_all[1, :, 17:].abs().max() == 0 and h_all[1, :, :17].abs().max() > 0


def test_max_intensity_torch_path_takes_bf16_assignments():
    """Assignments computed under bf16 autocast (a GPU run) with a float32 graph: H comes back in bf16, close
    to the float32 result (the scatter used to refuse the float32 source)."""
    g = torch.Generator().manual_seed(9)
    graph = _modularity.modularity_graph(torch.randn(2, 19, 8, generator=g))
    St = torch.rand(2, 3, 19, generator=g)
    q, h = _modularity._max_intensity_torch(St.bfloat16(), graph)
    q_ref, h_ref = _modularity._max_intensity_torch(St.bfloat16().float(), graph)
    assert h.dtype == torch.bfloat16
    torch.testing.assert_close(h.float(), h_ref, atol=2e-3, rtol=2e-2)
    torch.testing.assert_close(q.float(), q_ref, atol=2e-3, rtol=2e-2)


def test_modularity_from_a_precomputed_graph_matches_the_loss():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 15, 6, generator=g)
    S = F.relu(torch.randn(2, 15, 4, generator=g))
    graph = _modularity.modularity_graph(x)
    for intensity in ("max", "sum"):
        want = -_modularity.modularity_loss(x, S, intensity)
        torch.testing.assert_close(_modularity.modularity(S, graph, intensity).mean(), want)


def test_padded_batches_equal_each_image_alone():
    """Images of different sizes batch together zero-padded: concepts, assignments and modularity equal each
    image's own unpadded computation (folded and direct forms alike)."""
    model = _randomised(ConceptGenerator(dim=16, n_prototypes=3, n_rounds=2, n_heads=1, ffn_dim=24), 8)
    g = torch.Generator().manual_seed(9)
    images = [torch.randn(p, 16, generator=g) for p in (20, 13, 17)]
    lengths = torch.tensor([20, 13, 17])
    x = torch.zeros(3, 20, 16)
    for j, im in enumerate(images):
        x[j, : len(im)] = im
    x_hat = model.standardise(x)
    folded = model(None, x_hat, lengths)  # x=None forces the folded form
    direct = model.forward_reference(x, lengths)
    graph = _modularity.modularity_graph(x)
    for j, im in enumerate(images):
        alone = model.forward_reference(im[None])[0]
        torch.testing.assert_close(folded[j], alone, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(direct[j], alone, atol=2e-4, rtol=2e-4)
    S = F.relu(F.normalize(x, dim=-1) @ F.normalize(folded, dim=-1).transpose(1, 2))
    q = _modularity.modularity(S, graph, "max", lengths)
    for j, im in enumerate(images):
        own = _modularity.modularity(S[j : j + 1, : len(im)], _modularity.modularity_graph(im[None]), "max")
        torch.testing.assert_close(q[j], own[0], atol=1e-6, rtol=1e-5)


def test_modularity_names_an_unknown_intensity():
    S = torch.rand(1, 7, 3)
    graph = _modularity.modularity_graph(torch.randn(1, 7, 4))
    with pytest.raises(ValueError, match="intensity must be 'max' or 'sum', got 'mean'"):
        _modularity.modularity(S, graph, "mean")
