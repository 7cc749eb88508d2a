"""Raw student backbones and their JSON specs: the MLP (:class:`students.nets.MLPDenoiser`) and a diffusers UNet.

Every backbone has the raw call ``F(x_in, c_noise, c_noise_to=None, cond=None) -> Tensor`` of
:class:`students.nets.Backbone` (``x_in = c_in x``, ``c_noise`` from :mod:`students.precond`) and the
``torch.func.jvp`` entry point :meth:`~students.nets.Backbone.raw_fn`. A backbone is described by a JSON-serialisable
dict, so that a student's ``config()`` rebuilds it without the teacher:

* ``{"type": "mlp", "dim", "hidden", "depth", "emb_dim", "max_freq", "num_classes"}`` - a fresh MLP;
* ``{"type": "unet", "model": "UNet2DModel", "unet": <diffusers config>, "timestep_scale", "null_class"}`` - a
  diffusers UNet rebuilt with ``from_config`` (a teacher copy gets the teacher's weights afterwards).

Either may carry ``"guidance": {"emb_dim", "max_freq", "hidden", "default"}`` (:data:`students.nets.GUIDANCE_KEYS`):
a guidance-scale input read from ``cond.guidance`` (:class:`students.nets.GuidanceEmbedding`).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.cond import CondLike, as_cond, cond_guidance, cond_labels
from distill.core.registry import ConfigError

from .nets import Backbone, GuidanceEmbedding, MLPDenoiser

__all__ = ["Backbone", "MLPDenoiser", "UNetBackbone", "UNET_MODELS", "build_backbone", "clean_unet_config"]

#: diffusers model classes a ``{"type": "unet"}`` backbone may name (the raw call below is theirs)
UNET_MODELS = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "SD3Transformer2DModel")
#: the models among them that take text conditioning (``cond`` must be a ``Cond`` with ``embeds``)
TEXT_MODELS = ("UNet2DConditionModel", "SD3Transformer2DModel")


class UNetBackbone(Backbone):
    """A diffusers UNet behind the raw call: ``F(x_in, c_noise, c_noise_to, cond) =
    unet(x_in, timestep_scale * c_noise, <conditioning>).sample``.

    ``timestep_scale`` maps the parameterisation's ``c_noise`` to the network's timestep exactly as the teacher's
    ``sigma_to_timestep`` does (``teachers.DiffusersTeacher.timestep_scale``: 4 x ``edm_timestep_scale`` for EDM,
    where ``c_noise = log(sigma)/4``; 1 for VP, whose ``c_noise`` is the fractional timestep; ``num_train_timesteps``
    for rectified flow). Conditioning:

    * ``two_levels`` (flow maps, CTM arXiv:2310.02279): the target level's timestep ``timestep_scale * c_noise_to``
      enters through the class-embedding path (``class_embed_type="timestep"``, a second sinusoidal embedding added
      to the time embedding); its last linear is zero-initialised, so at init ``F`` ignores the target level. Such a
      UNet takes no labels.
    * ``num_class_embeds``: integer labels as ``class_labels``; ``cond=None`` means ``null_class``.
    * ``trig_time`` (a TrigFlow student copied from an EDM teacher): the raw call takes TrigFlow time
      ``c_noise = t`` and feeds the copied UNet EDM's ``log(sd tan t) / 4``, its output times ``sign``
      (:func:`students.students._teacher_specs`).
    * ``guidance`` (guidance distillation, LCM arXiv:2310.04378 / sCD arXiv:2410.11081): the scale ``w`` in
      ``cond.guidance`` enters as a zero-initialised MLP of its sinusoidal features *added to the UNet's time
      embedding* (a forward hook on ``unet.time_embedding``, live only during the call); the module is
      ``self.guidance_emb``, outside ``self.unet``, so the UNet's state dict stays the teacher's. At init the
      addition is exactly 0: a teacher copy equals the teacher for every ``w``. (diffusers' ``time_cond_proj_dim``,
      LCM's route, exists on ``UNet2DConditionModel`` only.)
    * text conditioning (``UNet2DConditionModel``, ``SD3Transformer2DModel``; copies of the latent teachers of
      :mod:`teachers.latent`): ``cond`` is a :class:`~distill.core.cond.Cond`; ``embeds`` go in as
      ``encoder_hidden_states``, SDXL-style UNets (``addition_embed_type="text_time"``) also get
      ``added_cond_kwargs={"text_embeds": pooled, "time_ids": added["time_ids"]}``, SD3 gets
      ``pooled_projections=pooled`` (and its timestep by keyword). ``mask`` is not passed (the pipelines do not).
    * ``DiTTransformer2DModel``: labels as ``class_labels`` (``None`` means ``null_class``); ``F`` is the first
      ``in_channels`` output channels (the learned-sigma channels are dropped, as the teacher and ``DiTPipeline``
      do); its label dropout (``class_dropout_prob``) is switched off, so a training-mode student sees its labels.
    * Flow-map (``two_levels``) students of these three models are not supported (only ``UNet2DModel`` has the
      class-embedding path that carries the target level).

    Args:
        unet: the diffusers model; reachable as ``self.unet`` (its ``mid_block`` is what GAN feature taps hook).
        timestep_scale: network timestep per unit ``c_noise``.
        two_levels: take the flow map's target level through the class embedding.
        null_class: label meaning "no class" for a class-conditional UNet.
        trig_time: ``{"sigma_data", "sign"}``: take TrigFlow time and give the UNet EDM's ``c_noise``.
        guidance: a guidance-scale input (``True`` or a dict of :data:`students.nets.GUIDANCE_KEYS`).
    """

    def __init__(self, unet: nn.Module, timestep_scale: float, two_levels: bool = False,
                 null_class: int | None = None, trig_time: dict[str, float] | None = None,
                 guidance: dict[str, Any] | bool | None = None) -> None:
        super().__init__()
        g = GuidanceEmbedding.spec(guidance)
        self.guidance_emb = None
        if g is not None:
            time_embedding = getattr(unet, "time_embedding", None)
            out_dim = getattr(getattr(time_embedding, "linear_2", None), "out_features", None)
            if out_dim is None:
                raise ConfigError(f"a guidance input needs a UNet with a time_embedding.linear_2 (diffusers' "
                                  f"TimestepEmbedding); {type(unet).__name__} has none")
            self.guidance_emb = GuidanceEmbedding(out_dim, **g)
        self.unet = unet
        self.timestep_scale = float(timestep_scale)
        self.trig_time = None if trig_time is None else {"sigma_data": float(trig_time["sigma_data"]),
                                                          "sign": float(trig_time["sign"])}
        if self.trig_time is not None and two_levels:
            raise ConfigError("a TrigFlow-time UNet backbone cannot also be a flow map")
        self.two_levels = bool(two_levels)
        self.null_class = null_class
        cfg = getattr(unet, "config", {})
        self.model = type(unet).__name__
        if two_levels and self.model != "UNet2DModel":
            raise ConfigError(f"a flow-map (two-level) student of a {self.model} is not supported; use a generator or "
                              "consistency student")
        if self.model == "DiTTransformer2DModel":  # no label dropout in a training-mode student
            for m in unet.modules():
                if hasattr(m, "dropout_prob") and hasattr(m, "embedding_table"):
                    m.dropout_prob = 0.0
        if two_levels:
            if getattr(unet, "class_embedding", None) is None or cfg.get("class_embed_type") != "timestep":
                raise ConfigError("a flow-map UNet backbone needs class_embed_type='timestep' in its unet config")
            # Zero the last linear of the target-level embedding: at init the target level is ignored.
            nn.init.zeros_(unet.class_embedding.linear_2.weight)
            nn.init.zeros_(unet.class_embedding.linear_2.bias)
        self.num_class_embeds = None if two_levels else cfg.get("num_class_embeds")

    @property
    def mid_block(self) -> nn.Module | None:
        """The UNet's bottleneck (the same module object as ``self.unet.mid_block``)."""
        return getattr(self.unet, "mid_block", None)

    def conditioning_kwargs(self, x_in: Tensor, c_noise_to: Tensor | None, cond: CondLike) -> dict[str, Any]:
        """Keyword arguments of the diffusers call other than ``sample`` and ``timestep``."""
        if self.guidance_emb is None and cond_guidance(cond) is not None:
            raise ValueError("this student has no guidance input but cond carries a guidance scale")
        if self.model in TEXT_MODELS:
            return self._text_kwargs(x_in, cond)
        if self.model == "DiTTransformer2DModel":
            labels = cond_labels(cond)
            if labels is None:
                labels = torch.full((x_in.shape[0],), self.null_class, device=x_in.device, dtype=torch.long)
            return {"class_labels": labels.long()}
        cond = cond_labels(cond)
        if self.two_levels:
            if cond is not None:
                raise ValueError("this flow-map UNet student is unconditional (its class path carries the target "
                                 "level)")
            if c_noise_to is None:
                raise ValueError("a flow-map UNet backbone needs the target level: pass c_noise_to")
            return {"class_labels": (self.timestep_scale * c_noise_to).to(x_in.dtype)}
        if self.num_class_embeds:
            if cond is None:
                if self.null_class is None:
                    raise ValueError("this student is class-conditional: pass class labels as cond")
                cond = torch.full((x_in.shape[0],), self.null_class, device=x_in.device, dtype=torch.long)
            return {"class_labels": cond.long()}
        # (UNet2DConditionModel / DiT: return {"encoder_hidden_states": cond} here.)
        return {}

    def _text_kwargs(self, x_in: Tensor, cond: CondLike) -> dict[str, Any]:
        """``encoder_hidden_states`` (+ ``added_cond_kwargs`` / ``pooled_projections``) of a text-conditional model."""
        c = as_cond(cond)
        if c is None or c.embeds is None:
            raise ValueError(f"this {self.model} student is text-conditional: cond must be a Cond with embeds "
                             "(the teacher's sample_cond)")
        dt = x_in.dtype
        kw: dict[str, Any] = {"encoder_hidden_states": c.embeds.to(dt)}
        if self.model == "SD3Transformer2DModel":
            kw["pooled_projections"] = c.pooled.to(dt)
        elif self.unet.config.get("addition_embed_type") == "text_time":
            kw["added_cond_kwargs"] = {"text_embeds": c.pooled.to(dt), "time_ids": c.added["time_ids"].to(dt)}
        return kw

    def forward(
        self, x_in: Tensor, c_noise: Tensor, c_noise_to: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor:
        """Args: ``x_in: [B, C, H, W]``, ``c_noise: [B]``, ``c_noise_to: [B]`` (flow maps), ``cond``: ``[B]`` labels, a
        :class:`~distill.core.cond.Cond` (with ``guidance: [B]`` for a guidance-conditioned backbone) or ``None``.
        Returns ``[B, C, H, W]``."""
        kwargs = self.conditioning_kwargs(x_in, c_noise_to, cond)
        if self.trig_time is not None:  # TrigFlow t -> EDM c_noise = log(sigma) / 4 with sigma = sd tan(t)
            c_noise = (torch.log(self.trig_time["sigma_data"] * torch.tan(c_noise.double())) / 4).to(c_noise.dtype)
        if self.guidance_emb is None:
            out = self.unet(x_in, timestep=self.timestep_scale * c_noise, **kwargs)
        else:
            g_emb = self.guidance_emb(cond, x_in.shape[0], x_in.device, x_in.dtype)  # [B, time_embed_dim]
            # Added to the time embedding's output for this call only (the hook is removed however the call ends).
            handle = self.unet.time_embedding.register_forward_hook(lambda _m, _i, emb: emb + g_emb.to(emb.dtype))
            try:
                out = self.unet(x_in, timestep=self.timestep_scale * c_noise, **kwargs)
            finally:
                handle.remove()
        out = out.sample if hasattr(out, "sample") else out
        if out.shape[1] != x_in.shape[1]:  # DiT's learned-sigma channels
            out = out[:, : x_in.shape[1]]
        return out if self.trig_time is None else self.trig_time["sign"] * out


def clean_unet_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """``dict(net.config)`` minus diffusers' private bookkeeping keys, with tuples as lists (JSON round-trips)."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.items() if not k.startswith("_")}


def build_backbone(spec: dict[str, Any], data_shape: tuple[int, ...], two_levels: bool) -> Backbone:
    """A fresh (untrained) backbone from its JSON spec (module docstring).

    Args:
        spec: the backbone dict.
        data_shape: one sample's shape (checked against the spec).
        two_levels: the student is a flow map (the backbone takes ``c_noise_to``).
    """
    kind = spec.get("type") if isinstance(spec, dict) else None
    if kind == "mlp":
        dim = math.prod(data_shape)
        kw = {k: v for k, v in spec.items() if k != "type"}
        if kw.setdefault("dim", dim) != dim:
            raise ConfigError(f"mlp backbone dim {kw['dim']} does not match data_shape {list(data_shape)}")
        return MLPDenoiser(two_levels=two_levels, **kw)
    if kind == "unet":
        import diffusers

        model = spec.get("model", "UNet2DModel")
        if model not in UNET_MODELS:
            raise ConfigError(f"unknown unet backbone model {model!r}; valid: {', '.join(UNET_MODELS)}")
        unet = getattr(diffusers, model).from_config(copy.deepcopy(dict(spec["unet"])))
        return UNetBackbone(unet, spec["timestep_scale"], two_levels=two_levels, null_class=spec.get("null_class"),
                            trig_time=spec.get("trig_time"), guidance=spec.get("guidance"))
    raise ConfigError(f"student backbone must be a dict with type 'mlp' or 'unet', got {spec!r}")
