"""Analytic teachers: isotropic Gaussian mixtures in any dimension, with exact denoiser, samples and log-density.

For ``p(x0) = sum_k pi_k N(mu_k, s_k^2 I)`` (``d`` dimensions) and ``x = x0 + sigma z`` the exact denoiser is
(methods.md §4)

    D*(x, sigma) = E[x0 | x] = sum_k r_k(x, sigma) (s_k^2 x + sigma^2 mu_k) / (s_k^2 + sigma^2),
    r_k = p(k | x) ∝ pi_k N(x; mu_k, (s_k^2 + sigma^2) I).

Derivation: given the component ``k``, ``x0 ~ N(mu_k, s_k^2 I)`` and ``x | x0 ~ N(x0, sigma^2 I)``, so ``(x0, x)`` is
jointly Gaussian with ``x | k ~ N(mu_k, v_k I)``, ``v_k = s_k^2 + sigma^2``, and the Gaussian conditional mean
``E[x0 | x, k] = mu_k + (s_k^2 / v_k)(x - mu_k) = (s_k^2 x + sigma^2 mu_k) / v_k``; Bayes gives ``p(k | x) = r_k`` and
the tower rule ``E[x0 | x] = sum_k p(k | x) E[x0 | x, k]``. The responsibilities are computed in log space,
``log r_k = log pi_k - |x - mu_k|^2 / (2 v_k) - (d/2) log(2 pi v_k) - logsumexp_j(...)`` (a softmax), so narrow,
far-apart or very unequal components never underflow to 0/0. The noised marginal
``p_sigma = sum_k pi_k N(mu_k, v_k I)`` gives the exact :meth:`GaussianMixtureTeacher.log_prob`, and Tweedie's formula
``D* = x + sigma^2 grad log p_sigma`` holds exactly (tests/test_mixture.py checks it by autograd).

Factories: :func:`mixture` (any means, per-component ``stds`` and ``weights`` from a config: the registered teacher
``mixture``), and its special cases :func:`ring`, :func:`grid` (equal weights, one std) and :func:`empirical`. An
empirical-data teacher is the mixture with ``s_k = 0`` at every data point (the exact denoiser of the empirical
distribution: it memorises, which is what makes it a closed form). With ``conditional=True`` the class label is the
component index, ``D(x, sigma, k)`` is component ``k``'s denoiser, and the unconditional denoiser is the full mixture,
so classifier-free guidance has an exact reference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from distill.core.cond import cond_labels
from distill.core.conversions import append_dims, as_sigma
from distill.core.registry import ConfigError

from .base import Teacher, TeacherInfo

__all__ = ["GaussianMixtureTeacher", "mixture", "ring", "grid", "empirical"]

_EXAMPLE = "e.g. means: [[0, 0], [3, 0]], stds: [0.1, 0.3], weights: [0.8, 0.2]"


def _numbers(value: Any, what: str) -> Tensor:
    """``value`` (a number, a possibly nested list, an array or a tensor) as float64, or one-line ConfigError."""
    if isinstance(value, Tensor):
        return value.detach().to(torch.float64)
    if isinstance(value, (str, bytes, dict)):
        raise ConfigError(f"mixture teacher: {what} must be numbers, got {value!r} ({_EXAMPLE})")
    try:
        return torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"mixture teacher: {what} must be numbers of a regular shape ({first}); {_EXAMPLE}") from None


def _check_means(means: Any) -> Tensor:
    if means is None:
        raise ConfigError(f"mixture teacher: 'means' is required, a list of K component means; {_EXAMPLE}")
    if isinstance(means, Sequence) and not isinstance(means, (str, bytes)):
        rows = list(means)
        if not rows:
            raise ConfigError(f"mixture teacher: means is empty; give at least one component mean; {_EXAMPLE}")
        if all(isinstance(r, Sequence) and not isinstance(r, (str, bytes)) for r in rows):
            lengths = [len(r) for r in rows]
            bad = next((i for i, n in enumerate(lengths) if n != lengths[0]), None)
            if bad is not None:
                raise ConfigError(
                    f"mixture teacher: means is ragged: means[0] has {lengths[0]} coordinates but means[{bad}] has "
                    f"{lengths[bad]}; every mean must have the same dimension, {_EXAMPLE}"
                )
    m = _numbers(means, "means")
    if m.ndim < 2 or m.shape[0] == 0 or m[0].numel() == 0:
        raise ConfigError(
            f"mixture teacher: means must be K >= 1 points of dimension >= 1, shape [K, D] (1-D data: [[0], [3]]), "
            f"got shape {list(m.shape)}; {_EXAMPLE}"
        )
    finite = torch.isfinite(m.reshape(m.shape[0], -1)).all(1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        raise ConfigError(f"mixture teacher: means must be finite, got means[{i}] = {m[i].reshape(-1).tolist()}")
    return m


def _check_per_component(value: Any, k: int, what: str, positive: bool) -> Tensor:
    """``[K]`` float64 from a scalar (broadcast) or K numbers, finite and >= 0 (or > 0 with ``positive``)."""
    t = _numbers(value, what)
    if t.ndim > 1 or (t.ndim == 1 and t.numel() not in (1, k)):
        raise ConfigError(
            f"mixture teacher: {what} has {t.numel()} entries (shape {list(t.shape)}) but means has {k} "
            f"component(s); give one {what[:-1]} per component" + (" or a single number for all" if what == "stds"
                                                                    else "") + f"; {_EXAMPLE}"
        )
    flat = t.reshape(-1)
    bad = ~torch.isfinite(flat) | ((flat <= 0) if positive else (flat < 0))
    if bool(bad.any()):
        i = int(bad.nonzero()[0])
        rule = "finite and > 0 (normalised here; drop a component rather than give it weight 0)" if positive \
            else "finite and >= 0 (0 = a point mass)"
        idx = f"[{i}]" if t.ndim == 1 else ""
        raise ConfigError(f"mixture teacher: {what}{idx} = {float(flat[i])}: every {what[:-1]} must be {rule}")
    return t


class GaussianMixtureTeacher(Teacher):
    """Exact teacher for an isotropic Gaussian mixture.

    Args:
        means: ``[K, *data_shape]`` component means.
        stds: ``[K]`` (or scalar) per-component standard deviations; 0 gives point masses.
        weights: ``[K]`` mixture weights (normalised here); uniform if omitted.
        conditional: expose the component index as a class label.
        sigma_min, sigma_max: the noise range samplers use.
    """

    def __init__(
        self,
        means: Tensor,
        stds: Tensor | float,
        weights: Tensor | None = None,
        conditional: bool = False,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
    ) -> None:
        # Every input is checked here (ring, grid, empirical and config-built mixtures alike): one-line ConfigError.
        means = _check_means(means)
        k = means.shape[0]
        stds = _check_per_component(stds, k, "stds", positive=False).expand(k).clone()
        if weights is None:
            weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
        else:
            weights = _check_per_component(weights, k, "weights", positive=True).expand(k)
        weights = weights / weights.sum()
        if not 0 < sigma_min < sigma_max:
            raise ConfigError(f"mixture teacher: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        flat = means.reshape(k, -1)
        mean = (weights[:, None] * flat).sum(0)
        var = (weights[:, None] * ((flat - mean) ** 2 + stds[:, None] ** 2)).sum(0).mean()
        info = TeacherInfo(
            data_shape=tuple(means.shape[1:]),
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            sigma_data=float(var.sqrt()),
            num_classes=k if conditional else None,
            extra={"kind": "gaussian_mixture", "components": k},
        )
        super().__init__(info)
        self.register_buffer("means", means)
        self.register_buffer("stds", stds)
        self.register_buffer("weights", weights)
        self.freeze()

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def _log_resp(self, xf: Tensor, sigma: Tensor) -> Tensor:
        """Unnormalised log posterior component weights ``[B, K]`` of flattened ``xf: [B, D]`` at ``sigma: [B]``:
        ``log pi_k + log N(x; mu_k, (s_k^2 + sigma^2) I)`` (its logsumexp over ``k`` is ``log p_sigma(x)``)."""
        d = xf.shape[1]
        var = self.stds[None, :] ** 2 + sigma[:, None] ** 2  # [B, K]
        sq = torch.cdist(xf, self.means.reshape(self.n_components, -1).to(xf.dtype)) ** 2  # [B, K]
        return self.weights.log()[None] - 0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        self.check_input(x)
        dtype = x.dtype
        sigma = as_sigma(sigma, x).to(torch.float64)
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        mu = self.means.reshape(self.n_components, -1)  # [K, D]
        s2 = self.stds**2  # [K]
        var = s2[None, :] + sigma[:, None] ** 2  # [B, K]
        cond = cond_labels(cond)
        if cond is None:
            resp = torch.softmax(self._log_resp(xf, sigma), dim=1)  # [B, K] r_k = p(k | x), normalised in log space
        else:
            resp = torch.nn.functional.one_hot(cond.long(), self.n_components).to(torch.float64)
        # Per-component Gaussian posterior mean: (s^2 x + sigma^2 mu) / (s^2 + sigma^2)
        a = resp * s2[None] / var  # coefficient on x
        b = resp * (sigma[:, None] ** 2) / var  # coefficients on mu_k
        out = a.sum(1, keepdim=True) * xf + b @ mu
        return out.reshape(x.shape).to(dtype)

    def null_cond(self, cond: Tensor) -> None:
        return None

    def log_prob(self, x: Tensor, sigma: Tensor | float = 0.0) -> Tensor:
        """Exact ``log p_sigma(x)`` of the noised mixture. Returns ``[B]``."""
        sigma = as_sigma(sigma, x).to(torch.float64)
        xf = x.reshape(x.shape[0], -1).to(torch.float64)
        return torch.logsumexp(self._log_resp(xf, sigma), dim=1)

    @property
    def class_probs(self) -> Tensor | None:
        """The mixture weights when the label is the component (``conditional``), else ``None``."""
        return self.weights if self.num_classes else None

    def sample(
        self, n: int, *, generator: torch.Generator | None = None, return_labels: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Exact samples ``[n, *data_shape]`` (float32), optionally with their component labels ``[n]``."""
        labels = torch.multinomial(self.weights.float(), n, replacement=True, generator=generator)
        z = torch.randn((n, *self.data_shape), generator=generator, dtype=torch.float64)
        x = self.means[labels] + append_dims(self.stds[labels], z.ndim) * z
        x = x.float()
        return (x, labels) if return_labels else x


def mixture(
    means: Any = None,
    stds: Any = 0.05,
    weights: Any = None,
    conditional: bool = False,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
) -> GaussianMixtureTeacher:
    """The registered teacher ``mixture``: an isotropic Gaussian mixture defined entirely in config.

    ``teacher: {name: mixture, means: [[0, 0], [3, 0]], stds: [0.1, 0.3], weights: [0.8, 0.2]}``

    Args:
        means: ``K`` component means, each a list of ``D >= 1`` coordinates (``[K, D]``; a tensor may also be
            ``[K, *data_shape]``). The data dimension is ``D``.
        stds: per-component isotropic standard deviations (``K`` numbers >= 0), or one number for all.
        weights: ``K`` positive mixture weights, normalised here; uniform if omitted.
        conditional: expose the component index as a class label (``D(x, sigma, k)`` = component ``k``'s denoiser).
        sigma_min, sigma_max: the noise range samplers use.
    Bad input (missing or ragged means, a length that does not match ``K``, a negative std or a non-positive
    weight) raises :class:`ConfigError` naming the bad value and what is valid.
    """
    return GaussianMixtureTeacher(
        means, stds, weights=weights, conditional=bool(conditional), sigma_min=sigma_min, sigma_max=sigma_max
    )


def ring(
    n_modes: int = 8, radius: float = 2.0, std: float = 0.05, conditional: bool = False
) -> GaussianMixtureTeacher:
    """The benchmark ring: ``n_modes`` equal-weight modes on a circle (defaults of docs/methods.md §4.4)."""
    angles = torch.arange(n_modes, dtype=torch.float64) * (2 * math.pi / n_modes)
    means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)
    return mixture(means, std, conditional=conditional)  # the special case: equal weights, one std


def grid(side: int = 5, spacing: float = 1.0, std: float = 0.05, conditional: bool = False) -> GaussianMixtureTeacher:
    """A ``side x side`` grid of modes centred at the origin (25 modes by default)."""
    c = (torch.arange(side, dtype=torch.float64) - (side - 1) / 2) * spacing
    means = torch.stack(torch.meshgrid(c, c, indexing="ij"), dim=-1).reshape(-1, 2)
    return mixture(means, std, conditional=conditional)  # the special case: equal weights, one std


def empirical(data: Tensor, std: float = 0.0) -> GaussianMixtureTeacher:
    """The exact denoiser of an empirical data set ``data: [N, *shape]`` (optionally smoothed by ``std``)."""
    return GaussianMixtureTeacher(torch.as_tensor(data, dtype=torch.float64), std)
