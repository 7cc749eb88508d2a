"""Adapter from a diffusers network + scheduler config to the project's denoiser ``D(x, sigma, cond) -> x0``.

Three scheduler families are recognised from the scheduler config's ``_class_name``. Every family is the affine
EDM form ``D = c_skip x + c_out F(c_in x, timestep_scale * c_noise)`` (Karras et al. 2022, arXiv:2206.00364, eq. 7
and Table 1), with the scalings (and the prediction types) taken from :mod:`distill.core.precond`, the one copy the
students share (docs/design.md §3.1):

* **EDM** (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``): Karras et al. preconditioning
  ``D = c_skip x + c_out F(c_in x, c_noise)`` with ``c_noise = edm_timestep_scale * log(sigma)`` (diffusers'
  EDM schedulers use 0.25; the project's shipped teachers use 250 = 1000/4, the scale of openai's consistency
  models and of ``CMStochasticIterativeScheduler``, which suits diffusers' sinusoidal timestep embedding and makes a
  distilled consistency student load in ``ConsistencyModelPipeline``); ``prediction_type`` ``epsilon``
  (EDM's F-prediction) or ``v_prediction`` (sign-flipped ``c_out``), exactly as diffusers' ``precondition_outputs``.
* **VP / DDPM** (``DDPMScheduler``, ``DDIMScheduler`` and every scheduler built from ``alphas_cumprod``):
  ``x_t = sqrt(abar) x_ve``, ``sigma_t = sqrt((1 - abar) / abar)``; the (fractional) timestep is found by linear
  interpolation of ``log sigma`` over the discrete table, as in k-diffusion's discrete wrappers;
  ``prediction_type`` ``epsilon``, ``v_prediction`` or ``sample``.
* **Rectified flow** (``FlowMatchEulerDiscreteScheduler``): ``t = sigma / (1 + sigma)``, ``x_t = x_ve / (1 + sigma)``,
  the network predicts ``u = eps - x0`` at timestep ``1000 t``.

Class-conditional UNets (``num_class_embeds``) take integer labels; when the teacher folder's ``distill_teacher.json``
names a ``null_class`` (the label trained as "no class"), classifier-free guidance is available.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.cond import CondLike, cond_labels
from distill.core.conversions import append_dims, sigma_from_alpha_bar
from distill.core.precond import denoiser_scalings

from .base import Teacher, TeacherInfo

__all__ = [
    "DiffusersTeacher",
    "EDM_SCHEDULERS",
    "FLOW_SCHEDULERS",
    "scheduler_family",
    "vp_log_sigmas",
    "load_diffusers_teacher",
]

EDM_SCHEDULERS = {"EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"}
FLOW_SCHEDULERS = {"FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"}
#: schedulers built from a discrete ``alphas_cumprod`` table (the VP family); a config without ``_class_name`` is VP
VP_SCHEDULERS = {
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "HeunDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "DPMSolverSDEScheduler", "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "SASolverScheduler", "LCMScheduler", "TCDScheduler",
    "DDIMParallelScheduler", "DDPMParallelScheduler",
}
PREDICTION_TYPES = {"epsilon", "v_prediction", "sample"}
TEACHER_META = "distill_teacher.json"


def scheduler_family(scheduler_config: dict[str, Any]) -> str:
    """``"edm"``, ``"flow"`` or ``"vp"`` for a diffusers scheduler config; an unknown ``_class_name`` raises a
    one-line :class:`ValueError` with the valid ones."""
    name = scheduler_config.get("_class_name", "DDPMScheduler")
    if name in EDM_SCHEDULERS:
        return "edm"
    if name in FLOW_SCHEDULERS:
        return "flow"
    if name in VP_SCHEDULERS:
        return "vp"
    raise ValueError(f"unknown scheduler _class_name {name!r} in the teacher's scheduler config; valid: "
                     f"{', '.join(sorted(EDM_SCHEDULERS | FLOW_SCHEDULERS | VP_SCHEDULERS))}")


def _alphas_cumprod(scheduler_config: dict[str, Any]) -> Tensor:
    """The VP table ``abar_t``, t = 0..T-1, computed by diffusers' own DDPMScheduler from the config."""
    from diffusers import DDPMScheduler

    keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")
    sched = DDPMScheduler(**{k: scheduler_config[k] for k in keys if scheduler_config.get(k) is not None})
    return sched.alphas_cumprod.to(torch.float64)


def vp_log_sigmas(scheduler_config: dict[str, Any]) -> Tensor:
    """``log sigma_t`` of a VP scheduler's discrete table, ascending ``[T]`` float64 (timestep ``t`` at index
    ``t``); the ``c_noise`` table of :func:`distill.core.precond.vp_c_noise`."""
    return sigma_from_alpha_bar(_alphas_cumprod(scheduler_config)).log()


class DiffusersTeacher(Teacher):
    """A diffusers network (``UNet2DModel`` or anything with the same ``(sample, timestep, class_labels)`` call)
    behind the denoiser contract.

    This class is also the one copy of the scheduler-family preconditioning for every diffusers teacher: the latent
    teachers of :mod:`teachers.latent` (SD-style UNets, DiT, SD3) subclass it and override only the hooks
    :meth:`_shape_of` (the sample shape), :meth:`_classes_of` (class count), :meth:`_net` (the network call with the
    model's own conditioning keywords, returning ``F``) and the metadata in ``extra``.

    Args:
        net: the diffusers model.
        scheduler_config: the scheduler's config dict (as saved by ``save_pretrained``).
        null_class: label used as "unconditional" for classifier-free guidance (class-conditional nets only).
        sigma_data: data standard deviation (EDM preconditioning and students' preconditioning).
    """

    def __init__(
        self,
        net: nn.Module,
        scheduler_config: dict[str, Any],
        null_class: int | None = None,
        sigma_data: float | None = None,
        sigma_min: float | None = None,
        sigma_max: float | None = None,
        edm_timestep_scale: float = 0.25,
        extra: dict[str, Any] | None = None,
    ) -> None:
        cfg = dict(scheduler_config)
        family = scheduler_family(cfg)
        pred = cfg.get("prediction_type", "epsilon")
        if pred not in PREDICTION_TYPES or (family == "edm" and pred == "sample"):
            raise ValueError(f"unsupported prediction_type {pred!r} for a {family} scheduler; valid: epsilon, "
                             f"v_prediction{', sample' if family == 'vp' else ''}")
        shape = self._shape_of(net)
        num_classes = self._classes_of(net, null_class)
        sd = float(sigma_data if sigma_data is not None else cfg.get("sigma_data", self.default_sigma_data))
        if family == "edm":
            lo, hi = float(cfg.get("sigma_min", 0.002)), float(cfg.get("sigma_max", 80.0))
        elif family == "flow":
            lo, hi = 0.002, 80.0
        else:
            table = sigma_from_alpha_bar(_alphas_cumprod(cfg))
            lo, hi = float(table[0]), float(table[-1])
        info = TeacherInfo(
            data_shape=shape,
            sigma_min=float(sigma_min if sigma_min is not None else lo),
            sigma_max=float(sigma_max if sigma_max is not None else min(hi, 80.0) if family == "vp" else hi),
            sigma_data=sd,
            num_classes=num_classes,
            extra={"family": family, "prediction_type": pred, "scheduler": cfg.get("_class_name"), **(extra or {})},
        )
        super().__init__(info)
        self.net = net
        self.family = family
        self.prediction_type = pred
        self.null_class = null_class
        self.edm_timestep_scale = float(edm_timestep_scale)
        self.scheduler_config = cfg
        if family == "vp":
            self.register_buffer("log_sigmas", vp_log_sigmas(cfg), persistent=False)
        self.freeze()

    #: the data std assumed when neither the argument nor the scheduler config gives one
    default_sigma_data = 0.5

    @staticmethod
    def _shape_of(net: nn.Module) -> tuple[int, ...] | None:
        """One sample's shape ``(in_channels, sample_size, sample_size)`` from the network config."""
        net_cfg = getattr(net, "config", {})
        if not net_cfg:
            return None
        size = net_cfg["sample_size"]
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (net_cfg["in_channels"], h, w)

    @staticmethod
    def _classes_of(net: nn.Module, null_class: int | None) -> int | None:
        """Number of real classes: ``num_class_embeds`` (minus the null class's row when there is one)."""
        net_cfg = getattr(net, "config", {})
        num_class_embeds = net_cfg.get("num_class_embeds") if net_cfg else None
        if not num_class_embeds:
            return None
        return num_class_embeds - 1 if null_class is not None else num_class_embeds

    # -- preconditioning and time conversions (distill.core.precond) ------------------------------------------
    @property
    def timestep_scale(self) -> float:
        """The network's ``timestep = timestep_scale * c_noise``: EDM ``c_noise = log(sigma)/4``, so
        ``4 * edm_timestep_scale``; VP ``c_noise`` is already the (fractional) timestep, so 1; rectified flow
        ``c_noise = t``, so ``num_train_timesteps``."""
        if self.family == "edm":
            return 4.0 * self.edm_timestep_scale
        if self.family == "flow":
            return float(self.scheduler_config.get("num_train_timesteps", 1000))
        return 1.0

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)``, each ``[B]``, with ``D = c_skip x + c_out F(c_in x, timestep_scale *
        c_noise)`` (:func:`distill.core.precond.denoiser_scalings` of this teacher's family)."""
        return denoiser_scalings(sigma, self.family, self.sigma_data, self.prediction_type,
                                 getattr(self, "log_sigmas", None))

    def sigma_to_timestep(self, sigma: Tensor) -> Tensor:
        """Network timestep for noise level ``sigma: [B]`` (fractional for VP tables)."""
        return self.timestep_scale * self.scalings(sigma)[3]

    def native_sigmas(self) -> Tensor | None:
        if self.family == "vp":
            return self.log_sigmas.exp().flip(0)
        return None

    # -- the contract ----------------------------------------------------------------------------------------
    def null_cond(self, cond: CondLike) -> CondLike:
        if self.null_class is None:
            raise ValueError("classifier-free guidance needs a teacher trained with a null class "
                             f"(set null_class in {TEACHER_META}); this teacher has none")
        labels = cond_labels(cond)
        if labels is None:
            raise ValueError("classifier-free guidance of a class-conditional teacher needs class labels in cond")
        null = torch.full_like(labels, self.null_class)
        return null if isinstance(cond, Tensor) else cond.replace(labels=null)

    def _net(self, x_in: Tensor, timestep: Tensor, cond: CondLike) -> Tensor:
        """The raw network output ``F(x_in, timestep, cond)`` (``[B, *data_shape]``)."""
        kwargs = {}
        cond = cond_labels(cond)
        if self.net.config.get("num_class_embeds"):
            if cond is None:
                if self.null_class is None:
                    raise ValueError("this teacher is class-conditional: pass class labels as cond")
                cond = torch.full((x_in.shape[0],), self.null_class, device=x_in.device, dtype=torch.long)
            kwargs["class_labels"] = cond.long()
        out = self.net(x_in, timestep, **kwargs)
        return out.sample if hasattr(out, "sample") else out

    def denoise(self, x: Tensor, sigma: Tensor, cond: CondLike = None) -> Tensor:
        """``D = c_skip x + c_out F(c_in x, timestep_scale * c_noise)``; see :meth:`scalings`. Args: ``x: [B, C, H,
        W]``, ``sigma: [B]``, ``cond``: ``[B]`` labels, a :class:`~distill.core.cond.Cond` or ``None``."""
        self.check_input(x)
        c_skip, c_out, c_in, c_noise = (append_dims(c, x.ndim) for c in self.scalings(sigma))
        out = self._net(c_in * x, self.timestep_scale * c_noise.reshape(-1), cond)
        return c_skip * x + c_out * out

    # -- persistence ------------------------------------------------------------------------------------------
    def save_pretrained(self, path: str | Path) -> None:
        """Write ``unet/``, ``scheduler/`` and ``distill_teacher.json`` (the layout :func:`load_diffusers_teacher`
        reads)."""
        from diffusers import SchedulerMixin  # noqa: F401  (documents the dependency)

        path = Path(path)
        self.net.save_pretrained(path / "unet")
        (path / "scheduler").mkdir(parents=True, exist_ok=True)
        (path / "scheduler" / "scheduler_config.json").write_text(json.dumps(self.scheduler_config, indent=2))
        meta = {"null_class": self.null_class, "sigma_data": self.sigma_data}
        if self.family == "edm":
            meta["edm_timestep_scale"] = self.edm_timestep_scale
        (path / TEACHER_META).write_text(json.dumps(meta, indent=2))


def load_diffusers_teacher(path: str | Path, subfolder: str = "unet", **overrides: Any) -> DiffusersTeacher:
    """Load a teacher from a **local** diffusers folder (``unet/`` + ``scheduler/``); nothing is downloaded."""
    from diffusers import UNet2DModel

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"teacher folder {str(path)!r} does not exist (a local diffusers folder with "
                                f"{subfolder}/ and scheduler/ is expected; hub ids are not fetched)")
    sched_file = path / "scheduler" / "scheduler_config.json"
    if not sched_file.is_file():
        raise FileNotFoundError(f"teacher folder {str(path)!r} has no scheduler/scheduler_config.json")
    if not (path / subfolder / "config.json").is_file():
        raise FileNotFoundError(f"teacher folder {str(path)!r} has no {subfolder}/config.json")
    net = UNet2DModel.from_pretrained(path / subfolder, local_files_only=True, use_safetensors=True)
    scheduler_config = json.loads(sched_file.read_text())
    meta_file = path / TEACHER_META
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    meta.update(overrides)
    return DiffusersTeacher(net, scheduler_config, **meta)
