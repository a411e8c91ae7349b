"""Optimal-transport clustering (OTC, semester study §3.2.2): k-means whose assignment step is Sinkhorn.

Each iteration: cosine similarities S (N, k) between unit points and centroids -> entropic OT with uniform
marginals (every point mass 1/N, every cluster mass 1/k) on the cost 1 - S -> soft assignment
W = N * plan -> centroids = W-weighted means, re-projected to the unit sphere. The cost 1 - S and the
cost -S give the same plan (a constant shift is absorbed by the dual potentials). The last Sinkhorn
half-step normalises over points (as SwAV's Sinkhorn-Knopp does), so every row of W sums to exactly 1
and the cluster masses carry the residual error of the truncated iterations.

Sinkhorn runs in the scaling domain (``ot.sinkhorn_scaling``: one exp of the (N, k) kernel per outer
iteration, then two matrix-vector products per Sinkhorn iteration, float64); ``ot_plan`` is the earlier
log-domain path, kept as the reference the tests compare against. Labels are the argmax of the final
plan, i.e. argmax_j (S_ij / temp + f_j) with the fitted cluster potentials f, which ``predict`` reuses.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

import numpy as np
import torch

from ..base import DatasetClusterer
from ..errors import ConfigError, NumericalError
from ..ot import sinkhorn_log_potentials, sinkhorn_scaling
from ..registry import register
from ._common import (
    InputTransform,
    check_choice,
    check_labels_finite,
    check_positive,
    initial_points,
    l2_normalise,
    prepare_input,
)

log = logging.getLogger(__name__)

_STUDY = {"n_iter": 200, "epsilon": 0.02, "sinkhorn_iter": 10, "init": "random"}
PRESETS: dict[str, dict[str, Any]] = {
    # §4.2.1: 200 update iterations, Sinkhorn temp 0.02 and 10 iterations (= the defaults).
    "study": {**_STUDY, "standardise": False},
    # Table 5 "OTC norm/std": per-dimension z-scored input.
    "study_normstd": {**_STUDY, "standardise": True},
    # Literal SwAV-style reading: every assignment step restarts Sinkhorn from zero potentials.
    "study_cold_start": {**_STUDY, "standardise": False, "warm_start": False},
}


def marginal_error(plan: torch.Tensor) -> float:
    """L1 distance (in [0, 2]) between the plan's cluster masses (column sums) and the uniform 1/k."""
    k = plan.shape[1]
    return float((plan.sum(0) - 1.0 / k).abs().sum())


def ot_plan(
    S: torch.Tensor, epsilon: float, n_iter: int, g_init: torch.Tensor | None = None, who: str = "otc"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform-marginal entropic OT plan (N, k) for similarities S (N, k), rows summing exactly to 1/N.

    Solved on the transposed (k, N) problem so that Sinkhorn's final update is the per-point one; also
    returns the per-point log-scaling for a warm start. A float32 NaN/inf is retried once in float64 with
    a logged warning, then raises NumericalError.
    """
    cost = (1.0 - S).T.contiguous()
    try:
        plan, _, g = sinkhorn_log_potentials(cost, epsilon, n_iter, g_init=g_init)
    except NumericalError as exc:
        if S.dtype == torch.float64:
            raise
        log.warning("%s: Sinkhorn in float32 failed (%s); retrying in float64", who, exc)
        plan, _, g = sinkhorn_log_potentials(cost.double(), epsilon, n_iter, g_init=g_init)
        plan, g = plan.float(), g.float()
    return plan.T, g


@register("dataset_clusterer", "otc", presets=PRESETS)
class OTClusterer(DatasetClusterer):
    """k-means with an entropic optimal-transport (Sinkhorn, equal cluster mass) assignment on cosine similarity."""

    version = "2"  # 2: scaling-domain Sinkhorn (float64), predict by the fitted cluster potentials

    def __init__(
        self,
        n_clusters: int = 21,
        n_iter: int = 200,
        epsilon: float = 0.02,
        sinkhorn_iter: int = 10,
        init: Literal["random", "k-means++"] = "random",
        standardise: bool = False,
        pca_dim: int | None = None,
        tol: float | None = None,
        warm_start: bool = True,
        predict_assign: Literal["plan", "nearest"] = "plan",
        marginal_tol: float = 0.05,
        seed: int = 0,
        device: str = "cpu",
    ):
        check_positive(
            "otc", n_clusters=n_clusters, n_iter=n_iter, epsilon=epsilon, sinkhorn_iter=sinkhorn_iter,
            pca_dim=pca_dim, marginal_tol=marginal_tol,
        )  # fmt: skip
        if tol is not None and tol < 0:
            raise ConfigError(f"otc: tol must be >= 0 or null, got {tol}")
        check_choice("otc", "init", init, ("random", "k-means++"))
        check_choice("otc", "predict_assign", predict_assign, ("plan", "nearest"))
        self.n_clusters = n_clusters
        self.n_iter = n_iter
        self.epsilon = epsilon
        self.sinkhorn_iter = sinkhorn_iter
        self.init = init
        self.standardise = standardise
        self.pca_dim = pca_dim
        self.tol = tol
        self.warm_start = warm_start
        self.predict_assign = predict_assign
        self.marginal_tol = marginal_tol
        self.seed = seed
        self.device = device

    def _logits(self, Z: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """-cost / temp = (cos - 1) / temp, (N, k)."""
        return (Z @ C.T.contiguous() - 1.0) / self.epsilon

    def fit(self, X: torch.Tensor) -> OTClusterer:
        transform = InputTransform(self.standardise, True, self.pca_dim, True, "otc")
        Z = prepare_input(transform, X, self.n_clusters, "otc", self.device, fit=True)
        self.transform_ = transform
        C = l2_normalise(initial_points(Z, self.n_clusters, self.init, np.random.default_rng(self.seed)))
        n = Z.shape[0]
        self.n_iter_ = 0
        log_u = None  # per-point log-scaling, carried across iterations when warm_start
        for it in range(1, self.n_iter + 1):
            plan, log_u, _ = sinkhorn_scaling(
                self._logits(Z, C), self.sinkhorn_iter, log_u if self.warm_start else None
            )
            W = (plan * n).to(Z.dtype)  # soft assignment, every row sums to 1
            mass = W.sum(0)
            new = l2_normalise((W.T @ Z) / mass.clamp_min(1e-12).unsqueeze(1))
            check_labels_finite(new, "otc", f"centroids at iteration {it}")
            shift = float(((new - C) ** 2).sum())
            C = new
            self.n_iter_ = it
            if self.tol is not None and shift <= self.tol:
                break
        logits = self._logits(Z, C)
        plan, _, log_v = sinkhorn_scaling(logits, self.sinkhorn_iter, log_u if self.warm_start else None)
        self.marginal_error_ = marginal_error(plan)
        if self.marginal_error_ > self.marginal_tol:
            log.warning(
                "otc: Sinkhorn did not reach equal cluster masses (L1 error %.3g > marginal_tol %.3g "
                "after sinkhorn_iter=%d); raise sinkhorn_iter or epsilon",
                self.marginal_error_, self.marginal_tol, self.sinkhorn_iter,
            )  # fmt: skip
        self.cluster_centers_ = C.float().cpu().numpy()
        self.cluster_potentials_ = log_v.cpu()
        self.labels_ = self._plan_argmax(logits).cpu()
        self.cluster_mass_ = (plan.sum(0) * n).float().cpu()
        return self

    def _plan_argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """Row argmax of the plan exp(log_u_i + logits_ij + f_j): the row scaling does not matter."""
        return (logits.double() + self.cluster_potentials_.to(logits.device)).argmax(1).long()

    def predict(self, X: torch.Tensor) -> torch.Tensor:
        """Labels by the fitted plan's rule argmax_j (cos_ij / temp + f_j) with the learned cluster potentials
        f (on the training vectors: exactly the argmax of the final plan), or by the nearest centroid."""
        if not hasattr(self, "cluster_centers_"):
            raise RuntimeError("otc: call fit before predict")
        Z = prepare_input(self.transform_, X, 1, "otc", self.device)
        C = torch.from_numpy(self.cluster_centers_).to(Z.device)
        if self.predict_assign == "nearest":
            return (Z @ C.T.contiguous()).argmax(1).long().cpu()
        return self._plan_argmax(self._logits(Z, C)).cpu()

    def artifacts(self) -> dict[str, Any]:
        if not hasattr(self, "marginal_error_"):
            return {}
        return {"n_iter": self.n_iter_, "marginal_error": self.marginal_error_,
                "cluster_mass": self.cluster_mass_.tolist(),
                "cluster_potentials": self.cluster_potentials_.tolist()}  # fmt: skip
