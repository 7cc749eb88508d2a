"""The student kinds, their registry, and how to build them from a teacher or from a saved config.

A student is *parameterisation x backbone*: a raw network ``F`` (:mod:`students.backbones`: a fresh MLP or a copy of
the teacher's diffusers UNet) under one preconditioning layer (:mod:`students.precond`, scalings from
:mod:`distill.core.precond` shared with the teachers). Every student is a :class:`students.base.FlowMapStudent`
(``J(x, s, t) = (t/s) x + (1 - t/s) D_theta(x, s, t)``) with

    D_theta(x, s, t) = c_skip(s) x + c_out(s) F(c_in(s) x, c_noise(s)[, c_noise(max(t, sigma_min))], cond),

and the kinds differ only in the scalings and in whether ``F`` sees the target level ``t``:

* :class:`GeneratorStudent` (``"generator"``) - a denoiser; ``D_theta(x, s)`` ignores ``t`` (DMD2, SiD, SIM,
  f-distill, kd, reflow, PD, TDM);
* :class:`ConsistencyStudent` (``"consistency"``) - the boundary ``f(x, sigma_min) = x`` built in (CD, iCT, ECT;
  :class:`students.precond.ConsistencyPrecond`);
* :class:`TrigFlowStudent` (``"trigflow"``) - the sCM parameterisation (arXiv:2410.11081), boundary at ``sigma = 0``;
* :class:`FlowMapNetStudent` (``"flowmap"``) - ``F`` also sees ``c_noise(t)`` (CTM, TCD, AYF).

``student.net`` is the raw backbone; :meth:`_Student.raw` / :meth:`_Student.raw_fn` are the ``torch.func.jvp``
entry points. ``config()`` = ``{"kind", "data_shape", "sigma_min", "sigma_max", "sigma_data", "backbone",
"precond"}`` (JSON), rebuilt by :func:`build_student_from_config` without the teacher.
"""

from __future__ import annotations

import copy
import math
from typing import Any

from torch import Tensor, nn

from distill.core.precond import cm_scalings, edm_scalings
from distill.core.registry import ConfigError, Registry
from teachers.base import Teacher

from .backbones import Backbone, build_backbone, clean_unet_config
from .base import FlowMapStudent
from .lora import add_lora, base_name, check_lora_spec, lora_param_names
from .nets import GuidanceEmbedding, RawFn
from .precond import DenoiserPrecond, build_precond

__all__ = [
    "edm_scalings",
    "cm_scalings",
    "GeneratorStudent",
    "ConsistencyStudent",
    "TrigFlowStudent",
    "FlowMapNetStudent",
    "STUDENTS",
    "MLP_KEYS",
    "build_student",
    "build_student_from_config",
]

#: keyword arguments of ``build_student(..., init="fresh")`` (the fresh MLP's hyper-parameters) and their defaults
MLP_KEYS: dict[str, Any] = {"hidden": 256, "depth": 4, "emb_dim": 64, "max_freq": 4.0}
INITS = ("teacher", "fresh")
#: parameterisation of a fresh student: EDM F-prediction (arXiv:2206.00364 Table 1)
FRESH_PRECOND: dict[str, Any] = {"family": "edm", "prediction_type": "epsilon"}


class _Student(FlowMapStudent):
    """Shared constructor, ``x0_estimate`` and ``config()`` of the kinds.

    Args:
        data_shape: shape of one sample, e.g. ``(2,)`` or ``(1, 8, 8)``.
        sigma_min, sigma_max, sigma_data: the teacher's noise range and data std.
        backbone: the backbone spec (:mod:`students.backbones`).
        precond: the parameterisation spec ``{"family", "prediction_type"[, "scheduler"]}``
            (:mod:`students.precond`); EDM F-prediction when omitted.
        lora: a LoRA spec (:mod:`students.lora`): the backbone's network gets peft adapters and only they train.

    Attributes:
        frozen_state_keys: state-dict keys (relative to the student) of frozen base parameters: EMAs share them
            with the student instead of averaging them (``distill.core.ema``).
        rebuilt_state_keys: the subset rebuilt from the teacher when a run is built (:func:`build_student`): they
            are left out of training checkpoints and filled back in on resume (``distill.module``).
    """

    frozen_state_keys: frozenset[str] = frozenset()
    rebuilt_state_keys: frozenset[str] = frozenset()

    #: whether ``F`` takes the target level (flow maps)
    two_levels = False
    #: the only family this kind accepts (``None``: any)
    family: str | None = None

    def __init__(
        self,
        data_shape: tuple[int, ...] | list[int],
        sigma_min: float,
        sigma_max: float,
        sigma_data: float,
        backbone: dict[str, Any],
        precond: dict[str, Any] | None = None,
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(tuple(data_shape), sigma_min, sigma_max, sigma_data)
        spec = dict(precond if precond is not None else ({"family": self.family} if self.family else FRESH_PRECOND))
        self.precond: DenoiserPrecond = build_precond(self.kind, spec, self.sigma_data, self.sigma_min)
        self.backbone = copy.deepcopy(backbone)
        self.net: Backbone = build_backbone(backbone, self.data_shape, two_levels=self.two_levels)
        self.lora: dict[str, Any] | None = None
        if lora is not None:
            self.enable_lora(lora)

    @property
    def takes_guidance(self) -> bool:
        """Whether the backbone takes the classifier-free-guidance scale ``cond.guidance`` as an input (built with
        ``guidance_input``; its spec is the backbone's ``"guidance"`` entry)."""
        return bool(self.backbone.get("guidance"))

    def lora_net(self) -> nn.Module:
        """The network LoRA adapters go into: the diffusers model of a UNet backbone, else the backbone itself."""
        return getattr(self.net, "unet", self.net)

    def lora_prefix(self) -> str:
        """The student state-dict prefix of :meth:`lora_net`'s keys."""
        return "net.unet." if hasattr(self.net, "unet") else "net."

    def enable_lora(self, spec: dict[str, Any]) -> None:
        """Inject LoRA adapters (:func:`students.lora.add_lora`) into :meth:`lora_net` and freeze its base; the spec
        goes into :meth:`config`, so :func:`build_student_from_config` rebuilds the same adapted structure."""
        if self.lora is not None:
            raise ConfigError("this student already has LoRA adapters")
        self.lora = check_lora_spec(spec)
        add_lora(self.lora_net(), self.lora)
        _, base = lora_param_names(self.lora_net())
        self.frozen_state_keys = frozenset(self.lora_prefix() + n for n in base)

    def raw(self, x_in: Tensor, c_noise: Tensor, c_noise_to: Tensor | None = None,
            cond: Tensor | None = None) -> Tensor:
        """The raw backbone ``F(x_in, c_noise[, c_noise_to], cond)`` (no preconditioning).

        Args: ``x_in: [B, *data_shape]`` (already ``c_in x``), ``c_noise: [B]``, ``c_noise_to: [B]`` (flow maps),
        ``cond: [B]`` or ``None``. Returns ``[B, *data_shape]``.
        """
        return self.net(x_in, c_noise, c_noise_to, cond)

    def raw_fn(self, cond: Tensor | None = None) -> RawFn:
        """``fn(x_in, c_noise, c_noise_to=None) -> F`` with ``cond`` closed over: the ``torch.func.jvp`` entry point
        (e.g. ``torch.func.jvp(student.raw_fn(cond), (x_in, c_noise), (dx_in, dc_noise))``)."""
        return self.net.raw_fn(cond)

    def scalings(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)``, each ``[B]``: ``D_theta = c_skip x + c_out raw(c_in x, c_noise,
        ...)``."""
        return self.precond.scalings(sigma)

    def x0_estimate(self, x: Tensor, sigma_from: Tensor, sigma_to: Tensor, cond: Tensor | None = None) -> Tensor:
        t = sigma_to.clamp_min(self.sigma_min) if self.two_levels else None
        return self.precond(self.raw_fn(cond), x, sigma_from, t)

    def config(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "data_shape": list(self.data_shape),
            "sigma_min": self.sigma_min,
            "sigma_max": self.sigma_max,
            "sigma_data": self.sigma_data,
            "backbone": copy.deepcopy(self.backbone),
            "precond": self.precond.config(),
            **({"lora": copy.deepcopy(self.lora)} if self.lora is not None else {}),
        }


class GeneratorStudent(_Student):
    """One-/few-step generator: ``D_theta(x, s)`` ignores the target level ``t``.

    Fresh: EDM preconditioning ``D = c_skip x + c_out F(c_in x, c_noise)`` (arXiv:2206.00364 eq. 7). Teacher copy:
    the teacher's own family and prediction type on the copied weights, so at init the student *is* the teacher's
    denoiser.
    """

    kind = "generator"


class ConsistencyStudent(_Student):
    """Consistency function ``f_theta(x, s)`` with ``f_theta(x, sigma_min) = x`` exactly (arXiv:2303.01469 App. C;
    :class:`students.precond.ConsistencyPrecond`).

    For an EDM-family teacher copy with ``edm_timestep_scale = 250`` (UNet timestep ``1000 c_noise = 250 log s``),
    ``c_in`` and the boundary ``c_skip/c_out`` are exactly diffusers' ``CMStochasticIterativeScheduler``, so the UNet
    exports to ``ConsistencyModelPipeline`` unchanged; with another scale the student still starts near the teacher.
    Any other teacher copy (VP, flow) uses ``f = c x + (1 - c) D_copy(x, s)``, which meets the same boundary.
    """

    kind = "consistency"


class TrigFlowStudent(_Student):
    """sCM's TrigFlow consistency function (Lu & Song 2024, arXiv:2410.11081, §3) in VE units:
    ``f = cos^2(t) x - sd sin(t) F(cos(t) x / sd, t)``, ``t = arctan(s / sd)``
    (:func:`distill.core.precond.trigflow_scalings`). The boundary ``f(x, 0) = x`` holds at ``sigma = 0``. A copy of
    an EDM-family teacher (``init="teacher"``) keeps the teacher's UNet and maps TrigFlow time to its EDM time input
    and output sign in the backbone (``trig_time``), so at init it is the teacher's denoiser; other families need
    ``init="fresh"``.
    """

    kind = "trigflow"
    family = "trigflow"


class FlowMapNetStudent(_Student):
    """General flow map: ``D_theta(x, s, t)`` depends on both levels (CTM arXiv:2310.02279, AYF arXiv:2506.14603).

    ``F`` also takes ``c_noise(max(t, sigma_min))`` (levels below ``sigma_min`` share one embedding: the map there
    is the identity up to ``sigma_min``'s noise). UNet teacher copy: the target level enters through the class
    embedding, zero-initialised (:class:`students.backbones.UNetBackbone`), so at init ``D_theta(x, s, t)`` equals the
    teacher's ``D(x, s)``. Only for teachers **without** class labels; a class-conditional teacher raises
    :class:`ConfigError`.
    """

    kind = "flowmap"
    two_levels = True


STUDENTS: Registry = Registry("student")
STUDENTS.register("generator")(GeneratorStudent)
STUDENTS.register("consistency")(ConsistencyStudent)
STUDENTS.register("flowmap")(FlowMapNetStudent)
STUDENTS.register("trigflow")(TrigFlowStudent)


# ---------------------------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------------------------

#: the public attributes a teacher with a copyable diffusers network has (``teachers.DiffusersTeacher``)
TEACHER_NET_ATTRS = ("net", "family", "prediction_type", "scheduler_config", "timestep_scale", "null_class")


def _has_network(teacher: Teacher) -> bool:
    return all(hasattr(teacher, a) for a in TEACHER_NET_ATTRS) and hasattr(teacher.net, "config")


def _teacher_specs(teacher: Teacher, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(backbone, precond)`` specs that copy ``teacher``'s network and parameterisation (public attributes only)."""
    unet = clean_unet_config(dict(teacher.net.config))
    if kind == "flowmap" and type(teacher.net).__name__ != "UNet2DModel":
        raise ConfigError(f"student 'flowmap' with init: teacher supports UNet2DModel teachers only, not a "
                          f"{type(teacher.net).__name__}; use a generator or consistency student")
    if kind == "flowmap":
        if unet.get("num_class_embeds") or unet.get("class_embed_type"):
            raise ConfigError(
                "student 'flowmap' with init: teacher needs a teacher UNet without class labels (its class-embedding "
                "path carries the target level); use init: fresh or another student kind for class-conditional teachers"
            )
        unet["class_embed_type"] = "timestep"
    backbone = {"type": "unet", "model": type(teacher.net).__name__, "unet": unet,
                "timestep_scale": float(teacher.timestep_scale), "null_class": teacher.null_class}
    precond: dict[str, Any] = {"family": teacher.family, "prediction_type": teacher.prediction_type}
    if kind == "trigflow":  # the one kind with its own parameterisation (``family``): its copy maps the network
        # TrigFlow's D = cos^2(t) x - sd sin(t) F(cos(t) x / sd, t) has EDM's c_skip and c_in and c_out = -(EDM's
        # epsilon-prediction c_out) (distill.core.precond.trigflow_scalings), so F = -F_edm(x_in, log(sd tan t) / 4)
        # (v_prediction EDM networks already carry the minus sign): at init the student is the teacher's denoiser.
        if teacher.family != "edm":
            raise ConfigError(f"student 'trigflow' with init: teacher needs an EDM-family teacher network, got a "
                              f"{teacher.family} one; use init: fresh")
        backbone["trig_time"] = {"sigma_data": float(teacher.info.sigma_data),
                                 "sign": -1.0 if teacher.prediction_type == "epsilon" else 1.0}
        precond = {"family": "trigflow"}
    if teacher.family == "vp":
        precond["scheduler"] = copy.deepcopy(dict(teacher.scheduler_config))
    return backbone, precond


def build_student(name: str, teacher: Teacher, init: str = "teacher", guidance_input: bool | dict[str, Any] = False,
                  **kwargs: Any) -> FlowMapStudent:
    """Build a student of kind ``name`` ("generator", "consistency", "flowmap", "trigflow") for ``teacher``.

    Args:
        name: the student kind (``STUDENTS`` registry name).
        teacher: the frozen teacher (only its metadata and, for ``init="teacher"``, its public network attributes
            ``TEACHER_NET_ATTRS`` and weights are read).
        init: ``"teacher"`` copies the teacher's network and parameterisation; ``"fresh"`` builds an
            EDM-preconditioned MLP.
        guidance_input: give the backbone a classifier-free-guidance-scale input read from ``cond.guidance``
            (guidance distillation, LCM/sCD-style; ``True`` or a dict of :data:`students.nets.GUIDANCE_KEYS`), saved
            in the backbone spec as ``"guidance"``. Train it with ``data.guidance: [w_min, w_max]`` so every batch
            carries a scale (:mod:`distill.data_sources`). A teacher copy stays exactly the teacher at init.
        **kwargs: fresh-MLP hyper-parameters (``hidden``, ``depth``, ``emb_dim``, ``max_freq``), and ``lora`` (any
            init): a LoRA spec (:mod:`students.lora`). A LoRA teacher copy trains only its adapters (and any layer
            the teacher does not have, such as a flow map's target-level embedding); its frozen base weights are
            the teacher's, listed in ``rebuilt_state_keys`` (rebuilt from the teacher, not checkpointed). A LoRA
            fresh MLP freezes its random base, which then stays in checkpoints.
    Returns:
        the student, in ``train()`` mode, on the teacher's device (CPU for network-free teachers), in float32.
    """
    cls = STUDENTS.get(name)
    info = teacher.info
    common = dict(
        data_shape=tuple(info.data_shape),
        sigma_min=info.sigma_min,
        sigma_max=info.sigma_max,
        sigma_data=info.sigma_data,
    )
    lora = kwargs.pop("lora", None)
    if lora is not None:
        lora = check_lora_spec(lora)
    guidance_spec = GuidanceEmbedding.spec(guidance_input)
    if init == "fresh":
        unknown = sorted(set(kwargs) - set(MLP_KEYS))
        if unknown:
            raise ConfigError(f"unknown student key(s) {unknown} for init: fresh; valid keys: "
                              f"{', '.join([*MLP_KEYS, 'lora'])}")
        backbone = {"type": "mlp", "dim": math.prod(info.data_shape), **MLP_KEYS, **kwargs,
                    "num_classes": info.num_classes}
        if guidance_spec is not None:
            backbone["guidance"] = guidance_spec
        return cls(backbone=backbone, lora=lora, **common)
    if init != "teacher":
        raise ConfigError(f"unknown student init {init!r}; valid inits: {', '.join(INITS)}")
    if kwargs:
        raise ConfigError(f"student init: teacher takes only the key lora, got {sorted(kwargs)} (MLP keys "
                          f"{', '.join(MLP_KEYS)} need init: fresh)")
    if not _has_network(teacher):
        raise ConfigError(f"student init: teacher copies the teacher's network, but {type(teacher).__name__} has no "
                          "network to copy; use init: fresh")
    backbone, precond = _teacher_specs(teacher, name)
    if guidance_spec is not None:
        backbone["guidance"] = guidance_spec
    student = cls(backbone=backbone, precond=precond, **common)
    src = teacher.net.state_dict()
    if name == "flowmap":
        missing, unexpected = student.net.unet.load_state_dict(src, strict=False)
        stray = [k for k in missing if not k.startswith("class_embedding.")] + list(unexpected)
        if stray:
            raise RuntimeError(f"teacher weights do not fit the flow-map UNet: {stray[:5]}")
    else:
        student.net.unet.load_state_dict(src, strict=True)
    if lora is not None:
        student.enable_lora(lora)
        # Base weights copied from the teacher stay frozen and are rebuilt from it; layers the teacher lacks (the
        # flow map's target-level embedding) have no copy to rebuild from, so they train and are checkpointed.
        prefix = student.lora_prefix()
        params = dict(student.named_parameters())
        rebuilt = {k for k in student.frozen_state_keys if base_name(k[len(prefix):]) in src}
        for k in student.frozen_state_keys - rebuilt:
            params[k].requires_grad_(True)
        student.frozen_state_keys = student.rebuilt_state_keys = frozenset(rebuilt)
    return student.to(next(teacher.net.parameters()).device).train()


def build_student_from_config(config: dict[str, Any]) -> FlowMapStudent:
    """Rebuild an (untrained) student from ``student.config()``, without the teacher; load weights afterwards."""
    cfg = dict(config)
    if "kind" not in cfg:
        raise ConfigError(f"student config needs a 'kind'; valid kinds: {', '.join(STUDENTS.names())}")
    cls = STUDENTS.get(cfg.pop("kind"))
    return STUDENTS.build(cls.registry_name, **cfg).train()
