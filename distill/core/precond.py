"""The one copy of the preconditioning math: how a raw network ``F`` becomes a denoiser in VE coordinates.

Every parameterisation in the project is the affine form of Karras et al. 2022 (EDM, arXiv:2206.00364, eq. 7):

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma)),

with ``x = x0 + sigma * eps`` (VE/EDM, docs/methods.md §0.1) and per-sample scalings of shape ``[B]`` (broadcast
with :func:`distill.core.conversions.append_dims`). This module holds the scalings of each family as pure functions
of ``sigma: [B]``; teachers (``teachers.diffusers_teacher``) and students (``students.precond``) both call them.

* :func:`edm_scalings` - EDM, Table 1 of arXiv:2206.00364;
* :func:`vp_scalings` / :func:`vp_c_noise` - VP / DDPM networks (Table 1, "VP" column) with epsilon, v or sample
  prediction;
* :func:`flow_scalings` - rectified flow (``x_t = (1 - t) x0 + t eps``, velocity ``u = eps - x0``);
* :func:`cm_scalings` - the consistency-model boundary scalings (Song et al. 2023, arXiv:2303.01469, App. C);
* :func:`trigflow_scalings` - TrigFlow / sCM (Lu & Song 2024, arXiv:2410.11081, §3), rewritten in VE units;
* :func:`denoiser_scalings` - the dispatch over those families that teachers and students share.

A network's own time input is ``timestep = timestep_scale * c_noise`` (a constant per network, chosen by whoever
owns the network: ``teachers.DiffusersTeacher.timestep_scale``, ``students.backbones.UNetBackbone``).

Only ``torch`` and ``distill.core`` are imported (foundation layer).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .conversions import alpha_bar_from_sigma, rf_t_from_sigma, trig_t_from_sigma

__all__ = [
    "edm_scalings",
    "cm_scalings",
    "trigflow_scalings",
    "vp_scalings",
    "vp_c_noise",
    "flow_scalings",
    "denoiser_scalings",
    "FAMILIES",
    "VP_PREDICTIONS",
]

#: parameterisation families :func:`denoiser_scalings` knows
FAMILIES = ("edm", "vp", "flow", "trigflow")

#: prediction types a VP network may have
VP_PREDICTIONS = ("epsilon", "v_prediction", "sample")


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM preconditioning, Karras et al. 2022 (arXiv:2206.00364) Table 1, "Ours" column:

    ``c_skip = sd^2 / (s^2 + sd^2)``, ``c_out = s sd / sqrt(s^2 + sd^2)``, ``c_in = 1 / sqrt(s^2 + sd^2)``,
    ``c_noise = log(s) / 4``.

    (``c_out`` is sign-flipped by callers whose network is trained on ``-F``, diffusers' ``v_prediction`` for EDM
    schedulers.)

    Args:
        sigma: ``[B]`` noise levels (> 0).
        sigma_data: data standard deviation ``sd``.
    Returns:
        ``(c_skip, c_out, c_in, c_noise)``, each ``[B]``.
    """
    v = sigma**2 + sigma_data**2
    return sigma_data**2 / v, sigma * sigma_data / v.sqrt(), 1 / v.sqrt(), sigma.log() / 4


def cm_scalings(sigma: Tensor, sigma_data: float, eps: float) -> tuple[Tensor, Tensor]:
    """Consistency-model boundary scalings, Song et al. 2023 (arXiv:2303.01469) App. C:
    ``c_skip = sd^2 / ((s - eps)^2 + sd^2)``, ``c_out = sd (s - eps) / sqrt(sd^2 + s^2)``.

    At ``s = eps`` they are exactly 1 and 0, so ``f = c_skip x + c_out F = x`` bit for bit (for finite ``F``).
    These are diffusers' ``CMStochasticIterativeScheduler.get_scalings_for_boundary_condition``. ``c_in`` and
    ``c_noise`` are EDM's (:func:`edm_scalings`).

    Args:
        sigma: ``[B]`` noise levels (>= eps).
        sigma_data: data standard deviation.
        eps: the boundary level (the student's ``sigma_min``).
    Returns:
        ``(c_skip, c_out)``, each ``[B]``.
    """
    d = sigma - eps
    return sigma_data**2 / (d**2 + sigma_data**2), sigma_data * d / (sigma_data**2 + sigma**2).sqrt()


def trigflow_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """TrigFlow (sCM, Lu & Song 2024, arXiv:2410.11081, §3) expressed in VE coordinates.

    TrigFlow writes ``x_t = cos(t) x0 + sin(t) z`` with ``z ~ N(0, sd^2 I)`` and the consistency function
    ``f(x_t, t) = cos(t) x_t - sin(t) sd F(x_t / sd, c_noise(t))`` with ``c_noise(t) = t``. In VE units
    ``sigma = sd tan(t)`` and ``x_t = cos(t) x`` (:func:`distill.core.conversions.sigma_from_trig_t`), so with
    ``cos(t) = sd / sqrt(s^2 + sd^2)`` and ``sin(t) = s / sqrt(s^2 + sd^2)``:

        f = cos^2(t) x - sin(t) sd F(cos(t) x / sd, t)
          = sd^2/(s^2 + sd^2) x - s sd/sqrt(s^2 + sd^2) F(x / sqrt(s^2 + sd^2), arctan(s / sd)),

    i.e. EDM's ``c_skip`` and ``c_in`` with ``c_out`` negated, and ``c_noise = t = arctan(s / sd)``. The
    boundary ``f(x, 0) = x`` holds at ``sigma = 0`` (``t = 0``), where ``c_skip = 1`` and ``c_out = 0``. The
    flow-matching optimum ``F = (cos(t) z - sin(t) x0) / sd`` (the TrigFlow velocity ``dx_t/dt`` over ``sd``) gives
    ``f = x0`` exactly.

    Args:
        sigma: ``[B]`` VE noise levels (>= 0).
        sigma_data: ``sd``.
    Returns:
        ``(c_skip, c_out, c_in, c_noise)``, each ``[B]``: ``cos^2 t``, ``-sd sin t``, ``cos(t) / sd``, ``t``.
    """
    t = trig_t_from_sigma(sigma, sigma_data)
    cos, sin = torch.cos(t), torch.sin(t)
    return cos**2, -sigma_data * sin, cos / sigma_data, t


def vp_scalings(sigma: Tensor, prediction_type: str = "epsilon") -> tuple[Tensor, Tensor, Tensor]:
    """VP / DDPM networks (``x_t = sqrt(abar) x0 + sqrt(1 - abar) eps``, ``abar = 1 / (1 + sigma^2)``) in the EDM
    form. Karras et al. 2022 (arXiv:2206.00364) Table 1, "VP" column, for ``epsilon``: ``c_skip = 1``,
    ``c_out = -sigma``, ``c_in = 1 / sqrt(sigma^2 + 1)``; ``v_prediction`` (Salimans & Ho 2022, arXiv:2202.00512,
    ``x0 = sqrt(abar) x_t - sqrt(1 - abar) v``): ``c_skip = abar``, ``c_out = -sigma sqrt(abar)``; ``sample``:
    ``c_skip = 0``, ``c_out = 1``. ``c_in = sqrt(abar)`` in all three (the network sees ``x_t``). The network's
    ``c_noise`` is its (fractional) timestep, :func:`vp_c_noise`.

    Args:
        sigma: ``[B]``; prediction_type: one of :data:`VP_PREDICTIONS`.
    Returns:
        ``(c_skip, c_out, c_in)``, each ``[B]``.
    """
    abar = alpha_bar_from_sigma(sigma)
    c_in = abar.sqrt()
    if prediction_type == "epsilon":
        return torch.ones_like(sigma), -sigma, c_in
    if prediction_type == "v_prediction":
        return abar, -(1 - abar).sqrt(), c_in
    if prediction_type == "sample":
        return torch.zeros_like(sigma), torch.ones_like(sigma), c_in
    raise ValueError(f"unknown VP prediction_type {prediction_type!r}; valid: {', '.join(VP_PREDICTIONS)}")


def vp_c_noise(sigma: Tensor, log_sigmas: Tensor) -> Tensor:
    """A discrete VP network's timestep for ``sigma`` (Table 1's ``c_noise = (M - 1) t`` with the discrete table):
    the fractional index of ``log sigma`` in ``log_sigmas`` (ascending ``[M]``, index ``i`` = timestep ``i``), by
    linear interpolation and clamped to the table, as in k-diffusion's ``DiscreteSchedule.sigma_to_t``.

    Args:
        sigma: ``[B]``; log_sigmas: ``[M]`` ascending (float64 is fine; the result has ``sigma``'s dtype).
    Returns:
        ``[B]`` fractional timesteps in ``[0, M - 1]``.
    """
    ls = log_sigmas.to(sigma.device)
    x = sigma.to(ls.dtype).log().clamp(ls[0], ls[-1])
    hi = torch.searchsorted(ls, x).clamp(1, ls.numel() - 1)
    lo = hi - 1
    w = (x - ls[lo]) / (ls[hi] - ls[lo])
    return (lo + w).to(sigma.dtype)


def flow_scalings(sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Rectified flow (``x_t = (1 - t) x0 + t eps``, network velocity ``u = eps - x0``, SD3 / FastGen convention)
    in the EDM form: with ``t = sigma / (1 + sigma)`` and ``x_t = x / (1 + sigma)``, ``x0 = x_t - t u``, so
    ``c_skip = c_in = 1 / (1 + sigma)``, ``c_out = -sigma / (1 + sigma)`` and ``c_noise = t`` (diffusers' flow
    networks take timestep ``num_train_timesteps * t``).

    Args:
        sigma: ``[B]``.
    Returns:
        ``(c_skip, c_out, c_in, c_noise)``, each ``[B]``.
    """
    c = 1 / (1 + sigma)
    t = rf_t_from_sigma(sigma)
    return c, -t, c, t


def denoiser_scalings(
    sigma: Tensor,
    family: str,
    sigma_data: float = 0.5,
    prediction_type: str = "epsilon",
    log_sigmas: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(c_skip, c_out, c_in, c_noise)`` of a denoiser family, so that ``D = c_skip x + c_out F(c_in x, c_noise)``.

    * ``"edm"``: :func:`edm_scalings`, ``c_out`` negated for ``v_prediction`` (diffusers' EDM
      ``precondition_outputs``);
    * ``"vp"``: :func:`vp_scalings` with ``c_noise`` = :func:`vp_c_noise` on ``log_sigmas``;
    * ``"flow"``: :func:`flow_scalings`;
    * ``"trigflow"``: :func:`trigflow_scalings`.

    Args:
        sigma: ``[B]`` noise levels.
        family: one of :data:`FAMILIES`.
        sigma_data: data std (``edm``, ``trigflow``).
        prediction_type: ``epsilon`` / ``v_prediction`` (``edm``), or one of :data:`VP_PREDICTIONS` (``vp``).
        log_sigmas: the VP network's ascending ``[M]`` table of ``log sigma`` (``vp`` only).
    Returns:
        four ``[B]`` tensors.
    """
    if family == "edm":
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, sigma_data)
        if prediction_type == "v_prediction":
            c_out = -c_out
        elif prediction_type != "epsilon":
            raise ValueError(f"unknown EDM prediction_type {prediction_type!r}; valid: epsilon, v_prediction")
        return c_skip, c_out, c_in, c_noise
    if family == "vp":
        if log_sigmas is None:
            raise ValueError("VP scalings need the network's log-sigma table (log_sigmas)")
        c_skip, c_out, c_in = vp_scalings(sigma, prediction_type)
        return c_skip, c_out, c_in, vp_c_noise(sigma, log_sigmas)
    if family == "flow":
        return flow_scalings(sigma)
    if family == "trigflow":
        return trigflow_scalings(sigma, sigma_data)
    raise ValueError(f"unknown preconditioning family {family!r}; valid: {', '.join(FAMILIES)}")
