"""OMH (Optimally Matched Hierarchy, Ozaydin et al. 2024): parallel cluster heads tied by OT plans.

N heads H^(i) with K_i = round(K * rho^i) cosine centres give soft assignments M^(i) = sim+(H^(i), F)
(cosine clipped at 0, no stop-gradient, so sparsity reaches the features F). Adjacent levels are tied by
A^(i,i+1) = entropic OT plan (uniform marginals, log-domain Sinkhorn in fp32) on the cost 1 - sim+(H^(i),
H^(i+1)). Loss terms (Eq. 3, 9-12): L_cluster^(i) = -mean_p sum_k onehot(argmax M)_k M_k (STEGO's cluster
probe loss) and L_match^(i,i+1) = mean_p sum_k |max_l A_kl M^(i+1)_l - M^(i)_k|.

Scaling of A: the plan with uniform marginals has total mass 1; it is multiplied by K_{i+1} so that each
lower-level (finer) cluster sends mass 1 to the higher level (column sums 1, row sums rho), i.e. the
"doubly stochastic" matrix of Sec. 3.3 with entries in [0, 1]; without it the transported activations
would be ~1/K_{i+1} of M^(i) and L_match could only be met by M -> 0. The heads are training-only.
"""

from __future__ import annotations

import functools
import inspect
import math
from typing import Any, Literal

import torch
from torch import nn

from ..errors import ConfigError
from ..ot import sinkhorn_log
from ._heads import CosinePrototypes, channels_last_flat

BALANCES = ("paper", "mean")
MAX_CHUNK_ELEMENTS = 1 << 24  # bound on the (pixels x K_i x K_{i+1}) product built for the max-pooling


def level_sizes(n_classes: int, levels: int, expansion: float) -> list[int]:
    """Cluster counts per level: K * rho^i rounded half up (27, 54, 108 for K=27, rho=2, N=3)."""
    return [max(1, math.floor(n_classes * expansion**i + 0.5)) for i in range(levels)]


def check_omh_params(
    omh_levels: int = 3,
    omh_expansion: float = 2.0,
    omh_epsilon: float = 0.02,
    omh_sparsity: float = 0.01,
    omh_structure: float = 0.3,
    omh_sinkhorn_iters: int = 100,
    omh_balance: str = "mean",
    **unchecked: Any,
) -> None:
    """One ConfigError naming the first OMH parameter out of range (omh, omh_match: any; omh_lr: checked with lr)."""
    if omh_balance not in BALANCES:
        raise ConfigError(f"omh_balance must be one of {BALANCES}, got {omh_balance!r}")
    if not isinstance(omh_levels, int) or omh_levels < 1:
        raise ConfigError(f"omh_levels must be an integer >= 1, got {omh_levels!r}")
    if omh_expansion < 1.0:
        raise ConfigError(f"omh_expansion must be >= 1, got {omh_expansion!r}")
    if omh_epsilon <= 0:
        raise ConfigError(f"omh_epsilon (OT temperature) must be > 0, got {omh_epsilon!r}")
    if omh_sparsity < 0 or omh_structure < 0:
        raise ConfigError(
            f"omh_sparsity and omh_structure must be >= 0, got {omh_sparsity!r}, {omh_structure!r}"
        )
    if not isinstance(omh_sinkhorn_iters, int) or omh_sinkhorn_iters < 1:
        raise ConfigError(f"omh_sinkhorn_iters must be an integer >= 1, got {omh_sinkhorn_iters!r}")


def soft_assign(x: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """sim+: cosine similarity of rows of x (P, D) to centres (K, D), negatives clipped to 0 -> (P, K)."""
    sim = nn.functional.normalize(x, dim=-1) @ nn.functional.normalize(centres, dim=-1).t()
    return sim.clamp_min(0.0)


def cluster_loss(m: torch.Tensor) -> torch.Tensor:
    """STEGO cluster-probe loss on assignments m (P, K): -mean over pixels of the winning cluster's score."""
    hard = nn.functional.one_hot(m.argmax(1), m.shape[1]).to(m.dtype)
    return -(hard * m).sum(1).mean()


def hierarchy_plan(
    coarse: torch.Tensor, fine: torch.Tensor, epsilon: float, n_iter: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, Z): Z = sim+(coarse, fine) (K_i, K_j) and the OT plan on 1 - Z scaled to column sums 1."""
    z = soft_assign(coarse.float(), fine.float())
    plan = sinkhorn_log(1.0 - z, epsilon, n_iter)
    return plan * fine.shape[0], z


def transported(a: torch.Tensor, m_fine: torch.Tensor) -> torch.Tensor:
    """M_hat (P, K_i): max over lower-level clusters l of A_kl * M_fine_pl (Eq. 9-10), memory-bounded.

    The arg-max is found without gradient in pixel chunks; the value is then rebuilt by gathering, which
    gives exactly max's (sub)gradient without keeping the (P, K_i, K_j) product for backward.
    """
    ki, kj = a.shape
    step = max(1, MAX_CHUNK_ELEMENTS // (ki * kj))
    with torch.no_grad():
        idx = torch.cat(
            [(a[None] * m_fine[s : s + step, None, :]).argmax(-1) for s in range(0, m_fine.shape[0], step)]
        )
    rows = torch.arange(ki, device=a.device)[None].expand_as(idx)
    return a[rows, idx] * m_fine.gather(1, idx)


def matching_loss(a: torch.Tensor, m_coarse: torch.Tensor, m_fine: torch.Tensor) -> torch.Tensor:
    """L_match (Eq. 11): mean over pixels of sum over higher-level clusters of |M_hat - M_coarse|."""
    return (transported(a, m_fine) - m_coarse).abs().sum(1).mean()


class OMHHeads(nn.Module):
    """The N parallel cluster heads of OMH and their losses on a code map."""

    def __init__(
        self,
        n_classes: int,
        dim: int,
        levels: int = 3,
        expansion: float = 2.0,
        epsilon: float = 0.02,
        sinkhorn_iters: int = 100,
        init: Literal["randn", "xavier"] = "randn",
        balance: Literal["paper", "mean"] = "paper",
    ):
        super().__init__()
        check_omh_params(omh_levels=levels, omh_expansion=expansion, omh_epsilon=epsilon,
                         omh_sinkhorn_iters=sinkhorn_iters, omh_balance=balance)  # fmt: skip
        self.balance = balance
        self.sizes = level_sizes(n_classes, levels, expansion)
        self.epsilon = epsilon
        self.sinkhorn_iters = sinkhorn_iters
        self.heads = nn.ModuleList(CosinePrototypes(k, dim, init) for k in self.sizes)

    def plans(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(A, Z) for each adjacent pair of levels, differentiable in the centres."""
        return [
            hierarchy_plan(self.heads[i].weight, self.heads[i + 1].weight, self.epsilon, self.sinkhorn_iters)
            for i in range(len(self.heads) - 1)
        ]

    def losses(self, code: torch.Tensor, with_match: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_cluster, L_match) for a code map (B, D, h, w) or rows (P, D).

        balance 'paper': sum over levels of L_cluster^(i) and over level pairs of L_match^(i,i+1) (each summed
        over clusters, Eq. 12); 'mean': mean over levels, and L_match^(i,i+1) divided by its K_i clusters
        before the mean over pairs (a per-cluster, per-level scale that does not grow with K or N).
        """
        x = channels_last_flat(code) if code.ndim == 4 else code
        x = x.float()
        assign = [soft_assign(x, head.weight) for head in self.heads]
        cluster = torch.stack([cluster_loss(m) for m in assign])
        cluster = cluster.mean() if self.balance == "mean" else cluster.sum()
        match = x.new_zeros(())
        if with_match and len(self.heads) > 1:
            terms = torch.stack(
                [matching_loss(a, assign[i], assign[i + 1]) for i, (a, _) in enumerate(self.plans())]
            )
            if self.balance == "mean":
                terms = terms / torch.tensor(self.sizes[:-1], dtype=terms.dtype, device=terms.device)
                match = terms.mean()
            else:
                match = terms.sum()
        return cluster, match

    @torch.no_grad()
    def hierarchy(self) -> dict[str, Any]:
        """The learned hierarchy for plots (Fig. 3): level sizes, plans A and centre affinities Z.

        Plain CPU tensors (no numpy), so a saved artifacts file loads with ``torch.load(weights_only=True)``.
        """
        pairs = self.plans()
        return {
            "sizes": list(self.sizes),
            "plans": [a.float().cpu() for a, _ in pairs],
            "affinities": [z.float().cpu() for _, z in pairs],
            "centres": [h.normalised().float().cpu() for h in self.heads],
        }


def omh_variant(base: type, doc: str) -> type:
    """A subclass of a head learner whose ``omh`` parameter defaults to True (registered as ``<name>_omh``).

    Same parameters, presets and code as ``base``; only the default of ``omh`` differs, so grids choose
    "with OMH" by name and still set every OMH ablation axis as a parameter.
    """
    init = base.__init__
    sig = inspect.signature(init)
    if "omh" not in sig.parameters:
        raise TypeError(f"{base.__name__} has no 'omh' parameter")
    new_sig = sig.replace(
        parameters=[p.replace(default=True) if p.name == "omh" else p for p in sig.parameters.values()]
    )

    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        bound = new_sig.bind(self, *args, **kwargs)
        bound.apply_defaults()
        init(*bound.args, **bound.kwargs)

    __init__.__signature__ = new_sig  # type: ignore[attr-defined]
    name = f"{base.__name__}OMH"
    return type(name, (base,), {"__init__": __init__, "__doc__": doc, "__module__": base.__module__,
                                "__qualname__": name})  # fmt: skip


def plot_hierarchy(
    info: dict[str, Any], path: str, pair: int = 0, title: str | None = None, file_format: str | None = None
) -> str:
    """Save the paper's Figure 3 for one level pair: centre affinities sim+ (left) beside the OT plan A.

    ``info`` is ``artifacts()["omh"]`` of an OMH learner (or ``OMHHeads.hierarchy()``); ``title`` goes above
    both panels; ``file_format`` overrides the one read from ``path``'s suffix. Returns ``path``.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not info.get("plans"):
        raise ValueError("plot_hierarchy: the hierarchy has a single level (omh_levels=1), no plan to plot")
    if not 0 <= pair < len(info["plans"]):
        raise ValueError(f"plot_hierarchy: pair must lie in [0, {len(info['plans'])}), got {pair}")
    z, a = info["affinities"][pair], info["plans"][pair]
    fig, axes = plt.subplots(1, 2, figsize=(10, 10 * a.shape[0] / a.shape[1] / 2 + 1.2))
    for ax, mat, panel in ((axes[0], z, "affinity sim+(H(i), H(i+1))"), (axes[1], a, "OT plan A(i,i+1)")):
        im = ax.imshow(mat, cmap="viridis", aspect="auto")
        ax.set_title(panel)
        ax.set_xlabel(f"level {pair + 1} clusters ({mat.shape[1]})")
        ax.set_ylabel(f"level {pair} clusters ({mat.shape[0]})")
        fig.colorbar(im, ax=ax, fraction=0.046)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format=file_format)
    plt.close(fig)
    return path
