"""The theory lab's own statistics: row σ, Gaussian predictions of k at coverage, exponent fits, quantiles.

Coverage, tail mass, ε counts and (ε,k)-sparsity of the rows themselves come from `attnsparse.measure.rowstats`,
the one implementation `measure` uses too. Every function works on a chunk of rows at once (last axis = keys).
Rows may have different lengths: keys a row cannot see carry probability exactly 0 (score -inf).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnsparse.measure.rowstats import k_at_coverage_from_top_mass

# Slack of "top-k mass >= 1 - eps" on float64 rows: cumulative sums carry ~1e-15 error per term, and planted or
# quantile rows put the mass exactly on 1 - eps.
COVER_SLACK = 1e-12


def norm_sf(x: torch.Tensor) -> torch.Tensor:
    """Φc(x) = 1 − Φ(x), the standard normal upper tail (computed as Φ(−x) to keep precision)."""
    return torch.special.ndtr(-x)


def float64(values: float | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """`values` as float64: a tensor stays on its device, a number becomes a tensor on `device` (default: cpu)."""
    if isinstance(values, torch.Tensor):
        return values.to(torch.float64)
    return torch.tensor(values, dtype=torch.float64, device=device if device is not None else "cpu")


def norm_ppf(p: float | torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
    """Φ⁻¹(p), the standard normal quantile (a float `p` becomes a tensor on `device`; a tensor stays where it is)."""
    return torch.special.ndtri(float64(p, device))


def row_std(scores: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Sample standard deviation of each row's visible scores (the σ the Gaussian prediction needs)."""
    n = visible.sum(dim=-1).to(scores.dtype)
    x = torch.where(visible, scores, torch.zeros_like(scores))
    mean = x.sum(dim=-1) / n
    dev = torch.where(visible, scores - mean.unsqueeze(-1), torch.zeros_like(scores))
    return (dev.pow(2).sum(dim=-1) / (n - 1).clamp(min=1)).sqrt()


def predicted_fraction(sigma: torch.Tensor | float, eps: float) -> torch.Tensor:
    """Large-n prediction k/n → Φc(σ + Φ⁻¹(ε)) for i.i.d. N(μ, σ²) scores (DESIGN §1)."""
    sigma = float64(sigma)
    return norm_sf(sigma + norm_ppf(eps, sigma.device))


def quantile_row_fraction(sigma: torch.Tensor, n: torch.Tensor, eps: float, width: int | None = None) -> torch.Tensor:
    """Finite-n prediction: k/n of the "quantile row" σ·Φ⁻¹(1 − (j−½)/n), j = 1..n, for each (σ, n) pair.

    A sample of n Gaussians has no keys beyond its maximum (≈ Φ⁻¹(1 − 1/n)); the asymptotic formula integrates
    over all of the tail and so overstates the mass of the top keys when n is not ≫ e^{σ²}. Evaluating the
    coverage rule on the deterministic row of expected order statistics keeps that truncation. The row is built
    in descending order, so no sort is needed; one grid is built per distinct n and shared by rows, on σ's device.
    """
    sigma = float64(sigma).reshape(-1)
    n = torch.as_tensor(n, device=sigma.device).long().reshape(-1).expand(sigma.shape)
    width = int(n.max()) if width is None else width
    lengths, inverse = torch.unique(n, return_inverse=True)
    j = torch.arange(width, dtype=torch.float64, device=sigma.device)
    u = (1.0 - (j.unsqueeze(0) + 0.5) / lengths.unsqueeze(-1).to(torch.float64)).clamp(min=1e-300)
    inside = (j.unsqueeze(0) < lengths.unsqueeze(-1))[inverse]
    scores = sigma.unsqueeze(-1) * norm_ppf(u)[inverse]
    scores = torch.where(inside, scores, torch.full_like(scores, -math.inf))
    cum = torch.softmax(scores, dim=-1).cumsum(dim=-1)  # descending row: already the top-k mass curve
    k = k_at_coverage_from_top_mass(cum, [eps], n, slack=COVER_SLACK)[:, 0]
    return k.to(torch.float64) / n.to(torch.float64)


def formula_local_exponent(sigma: float, dsigma_dlogn: float, eps: float) -> float:
    """d log(n·Φc(σ+Φ⁻¹(ε))) / d log n when σ depends on n: 1 − σ'(log n)·φ(z)/Φc(z), z = σ + Φ⁻¹(ε).

    For σ_n = √(2c·log n) this is 1 − (c/σ_n)·φ(z)/Φc(z): it tends to 1 − c only as fast as 1/√log n, which is why
    the growing regime shows exponents well above 1 − c at any n a computer can hold.
    """
    z = torch.tensor(sigma, dtype=torch.float64) + norm_ppf(eps)
    mills = torch.exp(-0.5 * z * z - 0.5 * math.log(2 * math.pi) - torch.special.log_ndtr(-z))  # φ(z)/Φc(z), stable
    return float(1.0 - dsigma_dlogn * mills)


@dataclass(frozen=True)
class ExponentFit:
    """Least-squares fit log k = log A + C · log n, with the coefficient of determination R²."""

    C: float
    log_A: float
    r2: float

    def as_dict(self) -> dict[str, float]:
        return {"C": self.C, "log_A": self.log_A, "r2": self.r2}


def fit_exponent(n: torch.Tensor | list[float], k: torch.Tensor | list[float]) -> ExponentFit:
    """Slope C of log k against log n (least squares) with R²; needs ≥ 2 distinct n and k > 0."""
    x = torch.as_tensor(n, dtype=torch.float64).log()
    y = torch.as_tensor(k, dtype=torch.float64).log()
    if x.numel() < 2 or float(x.max() - x.min()) == 0.0:
        raise ValueError("fit_exponent needs at least two distinct lengths n")
    xm, ym = x.mean(), y.mean()
    slope = ((x - xm) * (y - ym)).sum() / (x - xm).pow(2).sum()
    intercept = ym - slope * xm
    ss_res = (y - intercept - slope * x).pow(2).sum()
    ss_tot = (y - ym).pow(2).sum()
    r2 = 1.0 - float(ss_res / ss_tot) if float(ss_tot) > 0 else 1.0
    return ExponentFit(C=float(slope), log_A=float(intercept), r2=r2)


def local_exponents(n: list[int], k: list[float]) -> list[float | None]:
    """Slope of log k between consecutive lengths (None for the first): shows where C is heading."""
    out: list[float | None] = [None]
    for (n0, k0), (n1, k1) in zip(zip(n, k), zip(n[1:], k[1:])):
        out.append(math.log(k1 / k0) / math.log(n1 / n0))
    return out


def quantiles(values: torch.Tensor, qs: tuple[float, ...] = (0.1, 0.5, 0.9)) -> dict[str, float]:
    """Mean and the given quantiles of a 1-D tensor, keyed "mean", "p10", "p50", ..."""
    v = values.to(torch.float64)
    out = {"mean": float(v.mean())}
    for q in qs:
        out[f"p{round(q * 100)}"] = float(torch.quantile(v, q))
    return out
