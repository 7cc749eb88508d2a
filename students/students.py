"""The three student kinds, their registry, and how to build them from a teacher or from a saved config.

Every student is a :class:`students.base.FlowMapStudent` (``J(x, s, t) = (t/s) x + (1 - t/s) D_theta(x, s, t)``) and
differs only in its ``D_theta`` (its :meth:`x0_estimate`):

* :class:`GeneratorStudent` - ``D_theta(x, s)`` ignores ``t`` (DMD2, SiD, SIM, f-distill);
* :class:`ConsistencyStudent` - ``D_theta(x, s) = f_theta(x, s)`` with the boundary condition
  ``f_theta(x, sigma_min) = x`` built in (CD, iCT, ECT);
* :class:`FlowMapNetStudent` - ``D_theta(x, s, t)`` sees both noise levels (CTM, TCD, TDM, AYF).

A student wraps one *backbone*, described by a JSON-serialisable dict so that ``config()`` rebuilds the module
without the teacher object:

* ``{"type": "mlp", "dim", "hidden", "depth", "emb_dim", "max_freq", "num_classes"}`` - a fresh
  :class:`students.nets.MLPDenoiser`, EDM-preconditioned here (the net never sees raw sigma);
* ``{"type": "diffusers", "unet", "scheduler", "null_class", "sigma_data", "sigma_min", "sigma_max",
  "edm_timestep_scale"}`` - a copy of a :class:`teachers.DiffusersTeacher` (same parameterisation as the teacher,
  unfrozen), rebuilt with ``UNet2DModel.from_config``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import Tensor, nn

from distill.conversions import append_dims
from distill.registry import ConfigError, Registry
from teachers.base import Teacher
from teachers.diffusers_teacher import DiffusersTeacher

from .base import FlowMapStudent
from .nets import MLPDenoiser

__all__ = [
    "edm_scalings",
    "cm_scalings",
    "GeneratorStudent",
    "ConsistencyStudent",
    "FlowMapNetStudent",
    "STUDENTS",
    "MLP_KEYS",
    "build_student",
    "build_student_from_config",
]

#: keyword arguments of ``build_student(..., init="fresh")`` (the fresh MLP's hyper-parameters) and their defaults
MLP_KEYS: dict[str, Any] = {"hidden": 256, "depth": 4, "emb_dim": 64, "max_freq": 4.0}
INITS = ("teacher", "fresh")


# ---------------------------------------------------------------------------------------------------------------
# Preconditioning (pure functions)
# ---------------------------------------------------------------------------------------------------------------


def edm_scalings(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """EDM preconditioning, Karras et al. 2022 (arXiv:2206.00364) Table 1 / eq. 7.

    Args:
        sigma: ``[B]`` noise levels (> 0).
        sigma_data: data standard deviation.
    Returns:
        ``(c_skip, c_out, c_in, c_noise)``, each ``[B]``: ``sd^2/(s^2+sd^2)``, ``s sd/sqrt(s^2+sd^2)``,
        ``1/sqrt(s^2+sd^2)``, ``log(s)/4``.
    """
    r = (sigma**2 + sigma_data**2).sqrt()
    return sigma_data**2 / r**2, sigma * sigma_data / r, 1 / r, sigma.log() / 4


def cm_scalings(sigma: Tensor, sigma_data: float, eps: float) -> tuple[Tensor, Tensor]:
    """Consistency-model boundary scalings, Song et al. 2023 (arXiv:2303.01469) App. C:
    ``c_skip = sd^2 / ((s - eps)^2 + sd^2)``, ``c_out = sd (s - eps) / sqrt(sd^2 + s^2)``.

    At ``s = eps`` they are exactly 1 and 0, so ``f = c_skip x + c_out F = x`` bit for bit (for finite ``F``).
    These are diffusers' ``CMStochasticIterativeScheduler.get_scalings_for_boundary_condition``.

    Args:
        sigma: ``[B]``; sigma_data: data std; eps: the boundary level (``sigma_min``).
    Returns:
        ``(c_skip, c_out)``, each ``[B]``.
    """
    d = sigma - eps
    return sigma_data**2 / (d**2 + sigma_data**2), sigma_data * d / (sigma_data**2 + sigma**2).sqrt()


# ---------------------------------------------------------------------------------------------------------------
# Backbones
# ---------------------------------------------------------------------------------------------------------------


class _FlowMapUNetDenoiser(DiffusersTeacher):
    """A teacher-parameterised UNet whose class-embedding path (``class_embed_type="timestep"``) carries the flow
    map's *target* level. ``denoise(x, s, cond)`` takes that level's network timestep ``[B]`` (float) as ``cond``;
    everything else (families, prediction types, ``c_in``/``c_skip``/``c_out``) is the teacher's own code."""

    def _net(self, x_in: Tensor, timestep: Tensor, cond: Tensor | None) -> Tensor:
        if cond is None:
            raise ValueError("flow-map UNet: the target level's timestep must be passed as cond")
        out = self.net(x_in, timestep, class_labels=cond)
        return out.sample if hasattr(out, "sample") else out


def _clean_unet_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``dict(net.config)`` minus diffusers' private bookkeeping keys, with tuples as lists (JSON round-trips)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if not k.startswith("_")}


def _build_diffusers_backbone(bb: dict[str, Any], flowmap: bool) -> DiffusersTeacher:
    from diffusers import UNet2DModel

    net = UNet2DModel.from_config(dict(bb["unet"]))
    if flowmap:
        if net.class_embedding is None or bb["unet"].get("class_embed_type") != "timestep":
            raise ConfigError("a flow-map UNet backbone needs class_embed_type='timestep' in its unet config")
        # Zero the last linear of the target-level embedding: at init the student equals the teacher.
        nn.init.zeros_(net.class_embedding.linear_2.weight)
        nn.init.zeros_(net.class_embedding.linear_2.bias)
    cls = _FlowMapUNetDenoiser if flowmap else DiffusersTeacher
    inner = cls(
        net,
        dict(bb["scheduler"]),
        null_class=bb.get("null_class"),
        sigma_data=bb["sigma_data"],
        sigma_min=bb["sigma_min"],
        sigma_max=bb["sigma_max"],
        edm_timestep_scale=bb.get("edm_timestep_scale", 0.25),
    )
    # DiffusersTeacher freezes itself on construction; a student copy trains.
    inner.requires_grad_(True)
    inner.train()
    return inner


class _Student(FlowMapStudent):
    """Shared constructor, backbone building and ``config()`` of the three kinds.

    Args:
        data_shape: shape of one sample, e.g. ``(2,)`` or ``(1, 8, 8)``.
        sigma_min, sigma_max, sigma_data: the teacher's noise range and data std.
        backbone: the backbone dict described in the module docstring.
    """

    def __init__(
        self,
        data_shape: tuple[int, ...] | list[int],
        sigma_min: float,
        sigma_max: float,
        sigma_data: float,
        backbone: dict[str, Any],
    ) -> None:
        super().__init__(tuple(data_shape), sigma_min, sigma_max, sigma_data)
        if not isinstance(backbone, dict) or backbone.get("type") not in ("mlp", "diffusers"):
            raise ConfigError(f"student backbone must be a dict with type 'mlp' or 'diffusers', got {backbone!r}")
        self.backbone = copy.deepcopy(backbone)
        if backbone["type"] == "mlp":
            dim = math.prod(self.data_shape)
            kw = {k: v for k, v in backbone.items() if k != "type"}
            if kw.setdefault("dim", dim) != dim:
                raise ConfigError(f"mlp backbone dim {kw['dim']} does not match data_shape {list(self.data_shape)}")
            self.net: nn.Module = MLPDenoiser(two_levels=self.kind == "flowmap", **kw)
        else:
            self.net = _build_diffusers_backbone(backbone, flowmap=self.kind == "flowmap")

    @property
    def is_mlp(self) -> bool:
        return self.backbone["type"] == "mlp"

    def _mlp(self, x: Tensor, sigma: Tensor, c_noise_to: Tensor | None, cond: Tensor | None) -> tuple[Tensor, ...]:
        """Raw MLP output ``F(c_in x, c_noise[, c_noise_to])`` reshaped like ``x``, plus the EDM scalings."""
        c_skip, c_out, c_in, c_noise = edm_scalings(sigma, self.sigma_data)
        xf = x.reshape(x.shape[0], -1)
        f = self.net(append_dims(c_in, 2) * xf, c_noise, c_noise_to, cond).reshape(x.shape)
        return f, c_skip, c_out

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "data_shape": list(self.data_shape),
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "sigma_data": self.sigma_data,
            "backbone": copy.deepcopy(self.backbone),
        }


class GeneratorStudent(_Student):
    """One-/few-step generator: ``D_theta(x, s)`` ignores the target level ``t``.

    MLP backbone: EDM preconditioning ``D = c_skip x + c_out F(c_in x, c_noise)`` (arXiv:2206.00364 eq. 7).
    Teacher-copy backbone: the teacher's own parameterisation (``DiffusersTeacher.denoise`` on the copied weights),
    so at init the student *is* the teacher's denoiser.
    """

    kind = "generator"

    def x0_estimate(self, x: Tensor, sigma_from: Tensor, sigma_to: Tensor, cond: Tensor | None = None) -> Tensor:
        if self.is_mlp:
            f, c_skip, c_out = self._mlp(x, sigma_from, None, cond)
            return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * f
        return self.net.denoise(x, sigma_from, cond)


class ConsistencyStudent(_Student):
    """Consistency function ``f_theta(x, s)`` with ``f_theta(x, sigma_min) = x`` exactly (arXiv:2303.01469 App. C).

    ``f = c_skip x + c_out F`` with :func:`cm_scalings` (``eps = sigma_min``) and ``F``:

    * MLP backbone: ``F(c_in x, log(s)/4)``, ``c_in = 1/sqrt(s^2 + sd^2)``;
    * EDM-family teacher copy: the raw UNet, ``F(c_in x, timestep = edm_timestep_scale * log(s), class_labels)``
      (sign-flipped for ``v_prediction`` teachers, as the teacher does). With the project's
      ``edm_timestep_scale = 250`` this is exactly diffusers' ``CMStochasticIterativeScheduler`` convention
      (``sigma_to_t = 1000 * 0.25 * log(sigma)``, ``scale_model_input`` = ``c_in``, boundary ``c_skip``/``c_out``),
      so the UNet exports to ``ConsistencyModelPipeline`` unchanged; with another scale the student still starts
      near the teacher but the pipeline would need that scale;
    * any other teacher copy (VP, flow): ``f = c_skip x + (1 - c_skip) D_copy(x, s)``, which also meets the
      boundary condition and starts near the teacher's denoiser away from ``sigma_min``.
    """

    kind = "consistency"

    def x0_estimate(self, x: Tensor, sigma_from: Tensor, sigma_to: Tensor, cond: Tensor | None = None) -> Tensor:
        c_skip, c_out = cm_scalings(sigma_from, self.sigma_data, self.sigma_min)
        c_skip_x = append_dims(c_skip, x.ndim)
        if self.is_mlp:
            f, _, _ = self._mlp(x, sigma_from, None, cond)
            return c_skip_x * x + append_dims(c_out, x.ndim) * f
        inner: DiffusersTeacher = self.net  # type: ignore[assignment]
        if inner.family == "edm":
            c_in = append_dims(1 / (sigma_from**2 + self.sigma_data**2).sqrt(), x.ndim)
            sign = -1.0 if inner.prediction_type == "v_prediction" else 1.0
            raw = inner._net(c_in * x, inner.sigma_to_timestep(sigma_from), cond)
            return c_skip_x * x + append_dims(sign * c_out, x.ndim) * raw
        return c_skip_x * x + (1 - c_skip_x) * inner.denoise(x, sigma_from, cond)


class FlowMapNetStudent(_Student):
    """General flow map: ``D_theta(x, s, t)`` depends on both levels (CTM arXiv:2310.02279, AYF arXiv:2506.14603).

    MLP backbone: ``D = c_skip(s) x + c_out(s) F(c_in(s) x, log(s)/4, log(max(t, sigma_min))/4)`` (levels below
    ``sigma_min`` share one embedding: the map there is the identity up to ``sigma_min``'s noise).
    Teacher-copy backbone: the teacher UNet rebuilt with ``class_embed_type="timestep"``; the target level's network
    timestep enters through the class-embedding path, whose last linear is zero-initialised so that at init
    ``D_theta(x, s, t)`` equals the teacher's ``D(x, s)``. Only for teachers **without** class labels (the class path
    is taken); a class-conditional teacher raises :class:`ConfigError`.
    """

    kind = "flowmap"

    def x0_estimate(self, x: Tensor, sigma_from: Tensor, sigma_to: Tensor, cond: Tensor | None = None) -> Tensor:
        t = sigma_to.clamp_min(self.sigma_min)
        if self.is_mlp:
            f, c_skip, c_out = self._mlp(x, sigma_from, t.log() / 4, cond)
            return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * f
        if cond is not None:
            raise ValueError("this flow-map UNet student is unconditional (its class path carries the target level)")
        inner: DiffusersTeacher = self.net  # type: ignore[assignment]
        return inner.denoise(x, sigma_from, inner.sigma_to_timestep(t).to(x.dtype))


STUDENTS: Registry = Registry("student")
STUDENTS.register("generator")(GeneratorStudent)
STUDENTS.register("consistency")(ConsistencyStudent)
STUDENTS.register("flowmap")(FlowMapNetStudent)


# ---------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------


def _teacher_backbone(teacher: DiffusersTeacher, kind: str) -> dict[str, Any]:
    unet = _clean_unet_config(dict(teacher.net.config))
    if kind == "flowmap":
        if unet.get("num_class_embeds") or unet.get("class_embed_type"):
            raise ConfigError(
                "student 'flowmap' with init: teacher needs a teacher UNet without class labels (its class-embedding "
                "path carries the target level); use init: fresh or another student kind for class-conditional teachers"
            )
        unet["class_embed_type"] = "timestep"
    return {
        "type": "diffusers",
        "unet": unet,
        "scheduler": copy.deepcopy(dict(teacher.scheduler_config)),
        "null_class": teacher.null_class,
        "sigma_data": teacher.sigma_data,
        "sigma_min": teacher.sigma_min,
        "sigma_max": teacher.sigma_max,
        "edm_timestep_scale": teacher.edm_timestep_scale,
    }


def build_student(name: str, teacher: Teacher, init: str = "teacher", **kwargs: Any) -> FlowMapStudent:
    """Build a student of kind ``name`` ("generator", "consistency", "flowmap") for ``teacher``.

    Args:
        name: the student kind (``STUDENTS`` registry name).
        teacher: the frozen teacher (only its metadata and, for ``init="teacher"``, its weights are read).
        init: ``"teacher"`` copies the teacher's network (a :class:`DiffusersTeacher`); ``"fresh"`` builds an MLP.
        **kwargs: fresh-MLP hyper-parameters (``hidden``, ``depth``, ``emb_dim``, ``max_freq``).
    Returns:
        the student, in ``train()`` mode, on the CPU in float32.
    """
    cls = STUDENTS.get(name)
    info = teacher.info
    common = dict(
        data_shape=tuple(info.data_shape),
        sigma_min=info.sigma_min,
        sigma_max=info.sigma_max,
        sigma_data=info.sigma_data,
    )
    if init == "fresh":
        unknown = sorted(set(kwargs) - set(MLP_KEYS))
        if unknown:
            raise ConfigError(f"unknown student key(s) {unknown} for init: fresh; valid keys: {', '.join(MLP_KEYS)}")
        backbone = {"type": "mlp", "dim": math.prod(info.data_shape), **MLP_KEYS, **kwargs,
                    "num_classes": info.num_classes}
        return cls(backbone=backbone, **common)
    if init != "teacher":
        raise ConfigError(f"unknown student init {init!r}; valid inits: {', '.join(INITS)}")
    if kwargs:
        raise ConfigError(f"student init: teacher takes no extra keys, got {sorted(kwargs)} (MLP keys "
                          f"{', '.join(MLP_KEYS)} need init: fresh)")
    if not isinstance(teacher, DiffusersTeacher):
        raise ConfigError(f"student init: teacher copies the teacher's network, but {type(teacher).__name__} has no "
                          "network to copy; use init: fresh")
    student = cls(backbone=_teacher_backbone(teacher, name), **common)
    src = teacher.net.state_dict()
    if name == "flowmap":
        missing, unexpected = student.net.net.load_state_dict(src, strict=False)
        stray = [k for k in missing if not k.startswith("class_embedding.")] + list(unexpected)
        if stray:
            raise RuntimeError(f"teacher weights do not fit the flow-map UNet: {stray[:5]}")
    else:
        student.net.net.load_state_dict(src, strict=True)
    return student.to(next(teacher.net.parameters()).device).train()


def build_student_from_config(config: dict[str, Any]) -> FlowMapStudent:
    """Rebuild an (untrained) student from ``student.config()``, without the teacher; load weights afterwards."""
    cfg = dict(config)
    if "kind" not in cfg:
        raise ConfigError(f"student config needs a 'kind'; valid kinds: {', '.join(STUDENTS.names())}")
    cls = STUDENTS.get(cfg.pop("kind"))
    return STUDENTS.build(cls.registry_name, **cfg).train()
