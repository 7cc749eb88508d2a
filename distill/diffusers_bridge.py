"""Drive any diffusers scheduler with the project's VE denoiser, so baselines are diffusers' own solvers.

A diffusers scheduler keeps its sample in one of two coordinate systems (read off each family's source):

* **k-diffusion style** (``EulerDiscreteScheduler``, ``HeunDiscreteScheduler``, ``LMSDiscreteScheduler``,
  ``KDPM2*``, ``EulerAncestralDiscreteScheduler``, and the EDM schedulers; ``init_noise_sigma > 1``): the sample *is*
  the VE state ``x = x0 + sigma * eps``, and ``scheduler.sigmas[step_index]`` is the VE level.
* **VP** (``DDIMScheduler``, ``DDPMScheduler``, ``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``,
  ``DEISMultistepScheduler``, ...): the sample is ``x_vp = x_ve / sqrt(1 + sigma^2)``; schedulers with a
  ``sigmas`` table store the VE level ``sqrt((1 - abar)/abar)`` there, the others (DDIM, DDPM) index
  ``alphas_cumprod`` by the integer timestep.

At each step :func:`sample_diffusers` converts the sample to VE, calls ``D(x, sigma[B], cond)`` at the level the
scheduler is at, turns ``x0`` into the ``model_output`` the scheduler's ``prediction_type`` expects (``epsilon``,
``v_prediction``, ``sample``; EDM schedulers' ``precondition_outputs`` is inverted, being affine in the output) and
calls ``scheduler.step``. The start is ``x_ve = sigma_start * noise`` (not ``init_noise_sigma * noise``), the same
state the project's samplers start from. Honest note: a linear-beta VP scheduler starts near sigma = 157, beyond the
usual EDM ``sigma_max = 80``; the denoiser sees whatever level the scheduler visits.

Flow-matching schedulers (``FlowMatch*``, ``use_flow_sigmas``) start at ``t = 1``, i.e. ``sigma = inf``, and are
not bridged.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import Tensor
from tqdm.auto import tqdm

from distill.core.registry import ConfigError, check_kwargs
from distill.core.solver_steps import DenoiserFn

__all__ = ["SCHEDULER_NAMES", "make_scheduler", "scheduler_family", "scheduler_sigmas", "sample_diffusers"]

# Schedulers whose sample lives in VE coordinates (k-diffusion lineage and EDM); others are recognised as VE when
# they expose ``precondition_outputs`` (EDM) or an ``init_noise_sigma`` above 1.
_VE_CLASSES = {
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "LMSDiscreteScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DPMSolverSDEScheduler",
    "EDMEulerScheduler",
    "EDMDPMSolverMultistepScheduler",
}
_VP_CLASSES = {
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "UniPCMultistepScheduler",
    "DEISMultistepScheduler",
    "SASolverScheduler",
}

# Short name -> (diffusers class, defaults). VP ones are built from a linear-beta DDPM config.
_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "dpmpp_2m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 2, "solver_type": "midpoint",
                  "lower_order_final": True}),
    "dpmpp_3m": ("DPMSolverMultistepScheduler",
                 {"algorithm_type": "dpmsolver++", "solver_order": 3, "lower_order_final": True}),
    "unipc": ("UniPCMultistepScheduler", {"solver_type": "bh2", "lower_order_final": True}),
    "deis": ("DEISMultistepScheduler", {"algorithm_type": "deis", "lower_order_final": True}),
    # clip_sample defaults to True in DDIM/DDPM, which clamps x0 to [-1, 1]: wrong for anything but images.
    "ddim": ("DDIMScheduler", {"clip_sample": False, "set_alpha_to_one": True}),
    "ddpm": ("DDPMScheduler", {"clip_sample": False}),
    "euler": ("EulerDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "edm_euler": ("EDMEulerScheduler", {}),
}
SCHEDULER_NAMES = tuple(sorted(_SCHEDULERS))
_NO_BETAS = {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"}
_NO_KARRAS = {"DDIMScheduler", "DDPMScheduler", "EDMEulerScheduler"}


def make_scheduler(name: str, num_train_timesteps: int = 1000, karras: bool = False, **kwargs: Any) -> Any:
    """Build a common diffusers scheduler by short name from a VP linear-beta config (betas 1e-4 .. 0.02).

    Names: ``dpmpp_2m`` (DPM-Solver++ 2M, midpoint, lower_order_final), ``dpmpp_3m``, ``unipc`` (bh2; diffusers'
    default ``solver_order=2``), ``deis``, ``ddim`` (``clip_sample=False``), ``ddpm``, ``euler``, ``heun``, ``lms``,
    ``kdpm2``, ``edm_euler`` (EDM's own Karras grid; no betas). ``karras=True`` sets ``use_karras_sigmas=True``.
    ``kwargs`` override the defaults and are checked against the scheduler's constructor.
    """
    import diffusers  # lazy: seconds to import, and this module is imported by evaluation code that may not need it

    if name not in _SCHEDULERS:
        raise ConfigError(f"unknown scheduler {name!r}; valid schedulers: {', '.join(SCHEDULER_NAMES)}")
    cls_name, defaults = _SCHEDULERS[name]
    cls = getattr(diffusers, cls_name)
    cfg: dict[str, Any] = {}
    if cls_name not in _NO_BETAS:
        cfg.update(num_train_timesteps=num_train_timesteps, beta_start=0.0001, beta_end=0.02, beta_schedule="linear")
    cfg.update(defaults)
    if karras:
        if cls_name in _NO_KARRAS:
            raise ConfigError(f"scheduler {name!r} ({cls_name}) has no Karras sigmas; karras=True is valid for: "
                              f"{', '.join(n for n, (c, _) in sorted(_SCHEDULERS.items()) if c not in _NO_KARRAS)}")
        cfg["use_karras_sigmas"] = True
    cfg.update(kwargs)
    check_kwargs(cls.__init__, cfg, f"scheduler {name!r} ({cls_name})")
    return cls(**cfg)


def scheduler_family(scheduler: Any) -> str:
    """``"edm"`` (VE sample, EDM output preconditioning), ``"ve"`` (k-diffusion style) or ``"vp"``.

    Call after ``set_timesteps`` (some schedulers only know ``init_noise_sigma`` then).
    """
    name = type(scheduler).__name__
    if name.startswith("FlowMatch") or scheduler.config.get("use_flow_sigmas", False):
        raise ValueError(f"{name} is a flow-matching scheduler (starts at sigma = inf); sample_diffusers bridges "
                         f"VE and VP schedulers only (e.g. DPMSolverMultistepScheduler, EulerDiscreteScheduler)")
    if hasattr(scheduler, "get_scalings_for_boundary_condition"):
        raise ValueError(f"{name} samples a consistency model (its output is not a denoiser's); bridge a teacher "
                         f"solver instead (e.g. DPMSolverMultistepScheduler, EulerDiscreteScheduler)")
    if hasattr(scheduler, "precondition_outputs"):
        return "edm"
    if name in _VE_CLASSES:
        return "ve"
    if name in _VP_CLASSES:
        return "vp"
    return "ve" if float(scheduler.init_noise_sigma) > 1.0 else "vp"


def _has_sigma_table(scheduler: Any) -> bool:
    sig = getattr(scheduler, "sigmas", None)
    return isinstance(sig, Tensor) and sig.ndim == 1 and sig.numel() >= 2


def _vp_sigma(scheduler: Any, timestep: Any) -> float:
    """VE level of an integer VP timestep (negative = past the end: ``final_alpha_cumprod`` or 1)."""
    if not hasattr(scheduler, "alphas_cumprod"):
        raise ValueError(f"cannot tell the noise level of {type(scheduler).__name__}: it has neither a `sigmas` "
                         f"table nor `alphas_cumprod`; supported: schedulers with either (DDIM, DPMSolverMultistep, "
                         f"Euler, ...)")
    t = int(timestep)
    if t < 0:
        abar = float(getattr(scheduler, "final_alpha_cumprod", 1.0))
    else:
        abar = float(scheduler.alphas_cumprod[t])
    return math.sqrt(max(1.0 - abar, 0.0) / abar)


def _vp_prev_timestep(scheduler: Any, timestep: Any) -> int:
    if hasattr(scheduler, "previous_timestep"):
        return int(scheduler.previous_timestep(timestep))
    return int(timestep) - scheduler.config.num_train_timesteps // scheduler.num_inference_steps


def scheduler_sigmas(scheduler: Any, num_steps: int) -> Tensor:
    """The VE grid (float64, descending, final level included, usually 0) ``scheduler`` visits in ``num_steps``.

    Calls ``scheduler.set_timesteps(num_steps)``. For tables with repeated levels (Heun's interleaved grid; DEIS
    with Karras sigmas repeats its last level, a zero-length step) consecutive duplicates are dropped, so the
    project's sampler of the same method runs on exactly this grid. For DDIM-like schedulers without a table the
    levels are those of the timesteps plus the level of the last step's target (``final_alpha_cumprod``).
    """
    scheduler.set_timesteps(num_steps)
    scheduler_family(scheduler)  # rejects flow-matching schedulers
    if _has_sigma_table(scheduler):
        return torch.unique_consecutive(scheduler.sigmas.to(torch.float64))
    ts = scheduler.timesteps
    levels = [_vp_sigma(scheduler, t) for t in ts] + [_vp_sigma(scheduler, _vp_prev_timestep(scheduler, ts[-1]))]
    return torch.tensor(levels, dtype=torch.float64)


def _current_sigma(scheduler: Any, timestep: Any, i: int) -> float:
    """The VE level the scheduler evaluates the model at, at its ``i``-th call."""
    if _has_sigma_table(scheduler):
        idx = getattr(scheduler, "step_index", None)
        idx = i if idx is None else idx
        if not getattr(scheduler, "state_in_first_order", True) and hasattr(scheduler, "sigmas_interpol"):
            # KDPM2's second stage sits at a log-midpoint level; the ancestral variant indexes it one step back
            # (see each class's scale_model_input).
            back = 1 if type(scheduler).__name__ == "KDPM2AncestralDiscreteScheduler" else 0
            return float(scheduler.sigmas_interpol[idx - back])
        return float(scheduler.sigmas[idx])
    return _vp_sigma(scheduler, timestep)


def _model_output(scheduler: Any, family: str, x_ve: Tensor, sample: Tensor, x0: Tensor, sigma: float) -> Tensor:
    """Turn ``x0`` into the scheduler's expected ``model_output`` at VE level ``sigma`` (``sample`` in its coords)."""
    if family == "edm":
        # precondition_outputs(x, F, sigma) = c_skip x + c_out F is affine in F: invert it numerically.
        sig = torch.tensor(sigma, dtype=sample.dtype)
        skip = scheduler.precondition_outputs(sample, torch.zeros_like(sample), sig)
        c_out = scheduler.precondition_outputs(torch.zeros_like(sample), torch.ones_like(sample), sig)
        return (x0 - skip) / c_out
    pred = scheduler.config.get("prediction_type", "epsilon")
    if pred == "epsilon":
        return (x_ve - x0) / sigma  # eps is the same in VE and VP coordinates
    if pred in ("sample", "original_sample"):
        return x0
    if pred == "v_prediction":
        # Salimans & Ho v = sqrt(abar) eps - sqrt(1 - abar) x0 with abar = 1/(1 + sigma^2), written in VE x.
        return (x_ve - (1 + sigma**2) * x0) / (sigma * math.sqrt(1 + sigma**2))
    raise ValueError(f"unsupported prediction_type {pred!r} for {type(scheduler).__name__}; valid: epsilon, "
                     f"v_prediction, sample")


def sample_diffusers(
    denoiser: DenoiserFn,
    noise: Tensor,
    scheduler: Any,
    num_steps: int,
    cond: Tensor | None = None,
    *,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample with a diffusers ``scheduler`` driven by the VE denoiser ``D(x, sigma[B], cond) -> x0``.

    Args:
        denoiser: the project's denoiser (a Teacher, or ``functools.partial(teacher, guidance=w)``).
        noise: ``[B, ...]`` standard normal; the run starts from VE ``x = sigma_start * noise``.
        scheduler: a diffusers scheduler instance (VE or VP family; its state is reset by ``set_timesteps``).
        num_steps: passed to ``scheduler.set_timesteps``; the NFE is the number of timesteps it creates
            (``2N - 1`` for ``HeunDiscreteScheduler``).
        cond: conditioning passed to every denoiser call.
        generator: passed to ``scheduler.step`` where it takes one (ancestral / SDE schedulers).
        progress: show a tqdm bar.
    Returns:
        ``[B, ...]`` VE samples at the scheduler's final level (0 for the usual configs), in ``noise``'s dtype.
    """
    if not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")
    grid = scheduler_sigmas(scheduler, num_steps)  # also calls set_timesteps
    scheduler.set_timesteps(num_steps)  # fresh multistep state
    family = scheduler_family(scheduler)
    timesteps = scheduler.timesteps
    step_params = inspect.signature(scheduler.step).parameters
    step_kwargs = {"generator": generator} if "generator" in step_params else {}

    sigma0 = _current_sigma(scheduler, timesteps[0], 0)
    sample = sigma0 * noise if family != "vp" else (sigma0 / math.sqrt(1 + sigma0**2)) * noise
    iterator = range(len(timesteps))
    if progress:
        iterator = tqdm(iterator, desc=type(scheduler).__name__, leave=False)
    for i in iterator:
        t = timesteps[i]
        scheduler.scale_model_input(sample, t)  # for its side effects (step index, warnings); D takes VE x
        sigma = _current_sigma(scheduler, t, i)
        x_ve = sample if family != "vp" else sample * math.sqrt(1 + sigma**2)
        sig_b = torch.full((noise.shape[0],), sigma, dtype=noise.dtype, device=noise.device)
        x0 = denoiser(x_ve.to(noise.dtype), sig_b, cond).to(sample.dtype)
        out = _model_output(scheduler, family, x_ve, sample, x0, sigma)
        sample = scheduler.step(out, t, sample, **step_kwargs).prev_sample
    final = float(grid[-1])
    x = sample if family != "vp" else sample * math.sqrt(1 + final**2)
    return x.to(noise.dtype)
