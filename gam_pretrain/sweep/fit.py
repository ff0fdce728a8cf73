"""Scaling-law fits: L(N, D) = E + A / N^alpha + B / D^beta (Chinchilla approach 3) and isoFLOP
minima (approach 2), with bootstrap confidence intervals and compute-optimal allocations.

The parametric fit minimizes the Huber loss (delta 1e-3) between log L and
log L_hat = logsumexp(a - alpha log N, b - beta log D, e), A = exp(a), B = exp(b), E = exp(e),
from a grid of initialisations (Hoffmann et al. 2022, appendix D.2), all optimized at once as a
batch, the best few refined with L-BFGS. Intervals: refit on bootstrap resamples of the points.
Compute-optimal N for a budget C minimizes L(N, C / f(N)), where f(N) is the family's own training
FLOPs per token (a power law fitted to its ladder), not 6N.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

PARAMS = ("E", "A", "B", "alpha", "beta")
HUBER_DELTA = 1e-3


class FitError(ValueError):
    """Not enough (or not varied enough) points to fit a law; the message says what is missing."""


@dataclass
class Law:
    E: float
    A: float
    B: float
    alpha: float
    beta: float

    def loss(self, N, D):
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A / N ** self.alpha + self.B / D ** self.beta

    def as_dict(self) -> dict:
        return {k: getattr(self, k) for k in PARAMS}


def _objective(theta: torch.Tensor, logN: torch.Tensor, logD: torch.Tensor, logL: torch.Tensor) -> torch.Tensor:
    """Huber loss per initialisation; theta: (K, 5) = a, b, e, alpha, beta."""
    a, b, e, alpha, beta = theta.unbind(-1)
    pred = torch.logsumexp(torch.stack([a[:, None] - alpha[:, None] * logN, b[:, None] - beta[:, None] * logD,
                                        e[:, None].expand(-1, logN.numel())]), dim=0)
    return torch.nn.functional.huber_loss(pred, logL.expand_as(pred), delta=HUBER_DELTA, reduction="none").sum(-1)


def _init_grid() -> torch.Tensor:
    grid = itertools.product(np.arange(0, 30, 5), np.arange(0, 30, 5), np.arange(-1, 1.5, 0.5),
                             np.arange(0, 2.5, 0.5), np.arange(0, 2.5, 0.5))
    return torch.tensor(list(grid), dtype=torch.float64)


def _refine(theta0: torch.Tensor, data, max_iter: int = 500) -> tuple[torch.Tensor, float]:
    theta = theta0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([theta], lr=1, max_iter=max_iter, tolerance_grad=1e-12, tolerance_change=1e-14,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        value = _objective(theta[None], *data).sum()
        value.backward()
        return value

    opt.step(closure)
    with torch.no_grad():
        return theta.detach(), float(_objective(theta[None], *data).sum())


def _as_data(N, D, L):
    return tuple(torch.as_tensor(np.log(x), dtype=torch.float64) for x in (N, D, L))


def _fit_theta(N, D, L, refine_top: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Best theta from the whole grid (a batched Adam pass, then L-BFGS on the best few); also
    returns the refined candidates (starting points for the bootstrap refits)."""
    data = _as_data(N, D, L)
    theta = _init_grid().requires_grad_(True)
    opt = torch.optim.Adam([theta], lr=0.05)
    for _ in range(200):
        opt.zero_grad()
        _objective(theta, *data).sum().backward()
        opt.step()
    with torch.no_grad():
        values = _objective(theta, *data)
        values = torch.where(torch.isfinite(values), values, torch.full_like(values, float("inf")))
        best = theta[values.argsort()[:refine_top]].detach()
    results = sorted((_refine(t, data) for t in best), key=lambda r: r[1] if math.isfinite(r[1]) else float("inf"))
    return results[0][0], torch.stack([r[0] for r in results[:3]])


def _refit(N, D, L, starts: torch.Tensor) -> torch.Tensor:
    data = _as_data(N, D, L)
    results = [_refine(t, data, max_iter=100) for t in starts]
    return min(results, key=lambda r: r[1] if math.isfinite(r[1]) else float("inf"))[0]


def _law(theta: torch.Tensor) -> Law:
    a, b, e, alpha, beta = (float(x) for x in theta)
    return Law(E=math.exp(e), A=math.exp(a), B=math.exp(b), alpha=alpha, beta=beta)


def check_points(N, D, L, what: str = "the fit") -> None:
    N, D, L = map(np.asarray, (N, D, L))
    problems = []
    if len(L) < 6:
        problems.append(f"{len(L)} points (at least 6 for 5 parameters; more give tighter intervals)")
    if len(np.unique(N)) < 3:
        problems.append(f"{len(np.unique(N))} distinct model sizes (at least 3)")
    if len(np.unique(D)) < 2:
        problems.append(f"{len(np.unique(D))} distinct token counts (at least 2)")
    if np.any(~np.isfinite(L)) or np.any(L <= 0):
        problems.append("non-finite or non-positive losses")
    if problems:
        raise FitError(f"cannot fit L(N, D) for {what}: " + "; ".join(problems)
                       + ". Add sizes or budgets to the sweep, or let more runs finish.")


def fit_law(N, D, L, bootstrap: int = 100, seed: int = 0, what: str = "the fit") -> dict:
    """The law, its parameters' 95% bootstrap intervals, and the thetas of every resample."""
    check_points(N, D, L, what)
    N, D, L = (np.asarray(x, dtype=float) for x in (N, D, L))
    theta, starts = _fit_theta(N, D, L)
    rng = np.random.default_rng(seed)
    thetas = []
    for _ in range(bootstrap):
        idx = rng.integers(0, len(L), len(L))
        if len(np.unique(N[idx])) < 2 or len(np.unique(D[idx])) < 2:
            continue
        thetas.append(_refit(N[idx], D[idx], L[idx], starts[:2]))  # from the full-data optima: resamples stay near
    laws = [_law(t) for t in thetas]
    intervals = {k: [float(np.percentile([getattr(lw, k) for lw in laws], q)) for q in (2.5, 97.5)]
                 for k in PARAMS} if laws else {}
    residual = np.log(_law(theta).loss(N, D)) - np.log(L)
    return {"law": _law(theta), "intervals": intervals, "bootstrap_laws": laws,
            "rms_log_residual": float(np.sqrt(np.mean(residual ** 2))), "points": len(L)}


def flops_model(params: list[float], flops_per_token: list[float]) -> tuple[float, float]:
    """f(N) = c * N^gamma through the ladder's (N, FLOPs/token) pairs (least squares in log-log)."""
    gamma, log_c = np.polyfit(np.log(params), np.log(flops_per_token), 1)
    return float(math.exp(log_c)), float(gamma)


def compute_optimal(law: Law, budget: float, flops: tuple[float, float]) -> dict:
    """argmin_N L(N, C / f(N)) on a fine log grid, f(N) = c N^gamma."""
    c, gamma = flops
    N = np.logspace(3, 14, 4000)
    D = budget / (c * N ** gamma)
    loss = law.loss(N, D)
    i = int(np.argmin(loss))
    return {"N": float(N[i]), "D": float(D[i]), "loss": float(loss[i])}


def isoflop_minimum(N, L) -> dict | None:
    """Approach 2: a parabola in log N through one budget's runs; None when it has no minimum inside."""
    if len(np.unique(N)) < 3:
        return None
    x = np.log(np.asarray(N, dtype=float))
    k2, k1, k0 = np.polyfit(x, np.asarray(L, dtype=float), 2)
    if k2 <= 0:
        return None
    x_opt = -k1 / (2 * k2)
    inside = x.min() <= x_opt <= x.max()
    return {"N": float(math.exp(x_opt)), "loss": float(k0 + k1 * x_opt + k2 * x_opt ** 2), "inside_range": bool(inside),
            "parabola": [float(k2), float(k1), float(k0)]}
