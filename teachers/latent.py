"""Latent diffusers teachers: SD/SDXL-style text-to-image, DiT and SD3-style flow matching (loaded from a **local**
pipeline folder by :func:`teachers.folders.load_diffusers_folder`).

Three kinds join the pixel :class:`teachers.diffusers_teacher.DiffusersTeacher` (which they subclass: the scheduler
families, prediction types and the affine EDM form ``D = c_skip x + c_out F(c_in x, timestep_scale * c_noise)``
(Karras et al. 2022, arXiv:2206.00364 eq. 7) stay in that one class and in :mod:`distill.core.precond`):

* :class:`TextLatentTeacher` - Stable-Diffusion-style text-to-image: ``UNet2DConditionModel`` (``unet/``) over the
  latents of an ``AutoencoderKL`` (``vae/``), CLIP text encoder(s) and tokenizer(s) (``text_encoder/`` +
  ``tokenizer/``; SDXL-style folders add ``text_encoder_2/`` + ``tokenizer_2/`` and the UNet's
  ``addition_embed_type="text_time"``), any VP scheduler (Rombach et al. 2022, arXiv:2112.10752; SDXL: Podell et al.
  2023, arXiv:2307.01952). Also the SD3-style flow-matching ``SD3Transformer2DModel`` (``transformer/``) with
  ``FlowMatchEulerDiscreteScheduler`` (rectified flow, Esser et al. 2024, arXiv:2403.03206) and its two CLIP text
  encoders (``text_encoder/``, ``text_encoder_2/``; the T5 ``text_encoder_3/`` is optional, as in diffusers'
  ``StableDiffusion3Pipeline``, which then feeds zeros in its place).
* :class:`DiTTeacher` - the class-conditional latent transformer ``DiTTransformer2DModel`` (``transformer/`` +
  ``vae/``; Peebles & Xie 2023, arXiv:2212.09748); the null class of classifier-free guidance is label
  ``num_embeds_ada_norm`` (the label-embedding row diffusers' ``DiTPipeline`` uses as ``class_null``), and the
  learned-variance channels of the output (``out_channels == 2 * in_channels``) are dropped, as the pipeline does.

**Latents.** The teachers denoise in latent space: ``data_shape = (latent channels, h, w)``; a latent is
``(vae.encode(pixels) - shift_factor) * scaling_factor`` (``shift_factor`` 0 unless the VAE config has one, as SD3's),
so :meth:`LatentTeacherMixin.decode` is ``vae.decode(z / scaling_factor + shift_factor)``. Training never decodes;
evaluation, sample grids and ``distill sample`` decode through ``teacher.decode`` (``info.extra``: ``latent: True``,
``pixel_shape``). The default ``sigma_data`` of a latent teacher is 1 (the scaling factor makes latents roughly unit
variance).

Prompt embeddings and folder loading live in :mod:`teachers.folders`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.cond import Cond, CondLike, as_cond, cond_labels

from .diffusers_teacher import DiffusersTeacher

__all__ = ["DiTTeacher", "LatentTeacherMixin", "TextLatentTeacher"]


# ---------------------------------------------------------------------------------------------------------------
# Latent teachers
# ---------------------------------------------------------------------------------------------------------------

class LatentTeacherMixin:
    """The VAE side of a latent teacher: ``decode`` / ``encode`` and the pixel shape (``self.vae`` is an
    ``AutoencoderKL``)."""

    vae: nn.Module
    default_sigma_data = 1.0

    @staticmethod
    def latent_extra(vae: nn.Module, data_shape: tuple[int, ...]) -> dict[str, Any]:
        """``info.extra`` of a latent teacher: ``latent``, ``pixel_shape`` ``[C_pix, H * f, W * f]`` with the VAE's
        downsampling factor ``f = 2 ** (len(block_out_channels) - 1)``, ``vae_scaling_factor``, ``vae_shift_factor``."""
        f = 2 ** (len(vae.config.block_out_channels) - 1)
        return {"latent": True,
                "pixel_shape": [int(vae.config.out_channels), int(data_shape[1]) * f, int(data_shape[2]) * f],
                "vae_scaling_factor": float(vae.config.scaling_factor),
                "vae_shift_factor": float(getattr(vae.config, "shift_factor", None) or 0.0)}

    def decode(self, x: Tensor) -> Tensor:
        """Latents ``[B, *data_shape]`` -> pixels ``[B, *pixel_shape]`` in ``[-1, 1]``: ``vae.decode(z /
        scaling_factor + shift_factor)``, clamped (the pipelines' post-processing clamps too)."""
        extra = self.info.extra
        z = x.to(next(self.vae.parameters()).dtype) / extra["vae_scaling_factor"] + extra["vae_shift_factor"]
        return self.vae.decode(z).sample.clamp(-1.0, 1.0).to(x.dtype)

    def encode(self, pixels: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Pixels ``[B, *pixel_shape]`` in ``[-1, 1]`` -> latents ``[B, *data_shape]``: a sample of the VAE's
        posterior (its mean when ``generator`` is ``None``), shifted and scaled as the pipelines do."""
        extra = self.info.extra
        dist = self.vae.encode(pixels.to(next(self.vae.parameters()).dtype)).latent_dist
        z = dist.mean if generator is None else dist.sample(generator)
        return ((z - extra["vae_shift_factor"]) * extra["vae_scaling_factor"]).to(pixels.dtype)


class TextLatentTeacher(LatentTeacherMixin, DiffusersTeacher):
    """A text-to-image latent teacher (``UNet2DConditionModel`` or ``SD3Transformer2DModel``) on a fixed prompt set.

    Args:
        net: the denoiser network.
        vae: the ``AutoencoderKL``.
        scheduler_config: the scheduler config (VP for SD/SDXL, flow matching for SD3).
        prompts: the prompt strings (row ``i`` of the tables is prompt ``i``).
        table: the prompt tables: ``embeds [P, L, D]``, optional ``mask [P, L]``, ``pooled [P, Pd]``,
            ``time_ids [P, 6]``, and the empty prompt's ``null_embeds [1, L, D]`` (+ ``null_mask``, ``null_pooled``).
        sigma_data, sigma_min, sigma_max: as :class:`DiffusersTeacher` (``sigma_data`` defaults to 1).
        extra: further ``info.extra`` entries (the loader records the folder's kind and pipeline class).
    """

    def __init__(self, net: nn.Module, vae: nn.Module, scheduler_config: dict[str, Any], prompts: Sequence[str],
                 table: dict[str, Tensor], sigma_data: float | None = None, sigma_min: float | None = None,
                 sigma_max: float | None = None, extra: dict[str, Any] | None = None) -> None:
        shape = self._shape_of(net)
        super().__init__(net, scheduler_config, null_class=None, sigma_data=sigma_data, sigma_min=sigma_min,
                         sigma_max=sigma_max, extra={**self.latent_extra(vae, shape), "num_prompts": len(prompts),
                                                     **(extra or {})})
        self.vae = vae.eval().requires_grad_(False)
        self.prompts = list(prompts)
        for name, t in table.items():
            self.register_buffer(name, t.detach().clone(), persistent=False)
        self.table_fields = tuple(table)
        self.freeze()

    @property
    def conditional(self) -> bool:
        return True

    @property
    def is_sd3(self) -> bool:
        return type(self.net).__name__ == "SD3Transformer2DModel"

    def _rows(self, idx: Tensor, null: bool = False) -> Cond:
        """The :class:`Cond` of prompt rows ``idx`` (``null``: the empty prompt, ``idx`` only gives the batch)."""
        p = "null_" if null else ""
        pick = (lambda t: t.expand(idx.shape[0], *t.shape[1:])) if null else (lambda t: t[idx])
        embeds = pick(getattr(self, p + "embeds"))
        mask = pick(getattr(self, p + "mask")) if p + "mask" in self.table_fields else None
        pooled = pick(getattr(self, p + "pooled")) if p + "pooled" in self.table_fields else None
        added = {"time_ids": self.time_ids[idx] if not null else
                 self.time_ids[:1].expand(idx.shape[0], -1)} if "time_ids" in self.table_fields else {}
        return Cond(embeds=embeds, mask=mask, pooled=pooled, added=added)

    def sample_cond(self, n: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> Cond:
        """``n`` prompts drawn uniformly (indices from ``generator`` on the CPU) as a :class:`Cond` (module
        docstring), on ``device`` (default: the CPU)."""
        idx = torch.randint(0, len(self.prompts), (n,), generator=generator)
        cond = self._rows(idx.to(self.embeds.device))
        return cond.map(lambda t: t.to(device or "cpu"))

    def prompt_cond(self, indices: Sequence[int] | Tensor) -> Cond:
        """The :class:`Cond` of the given prompt indices (on the teacher's device)."""
        return self._rows(torch.as_tensor(indices, dtype=torch.long, device=self.embeds.device))

    def null_cond(self, cond: CondLike) -> Cond:
        """The empty prompt's embeddings (the pipeline's negative prompt ``None``), one row per row of ``cond``;
        SDXL's ``time_ids`` are kept (the pipeline uses the same ones for both halves)."""
        c = as_cond(cond)
        if c is None:
            raise ValueError("classifier-free guidance of a text-conditional teacher needs a Cond with embeds")
        null = self._rows(torch.zeros(len(c), dtype=torch.long, device=self.embeds.device), null=True)
        null = null.map(lambda t: t.to(c.embeds.device if c.embeds is not None else t.device))
        return null.replace(added=dict(c.added)) if c.added else null

    def _net(self, x_in: Tensor, timestep: Tensor, cond: CondLike) -> Tensor:
        """``unet(x_in, t, encoder_hidden_states=embeds[, added_cond_kwargs])`` or SD3's
        ``transformer(hidden_states=x_in, timestep=t, encoder_hidden_states=embeds, pooled_projections=pooled)``;
        ``cond=None`` means the empty prompt."""
        c = as_cond(cond)
        if c is None:
            c = self.null_cond(Cond(labels=torch.zeros(x_in.shape[0], dtype=torch.long, device=x_in.device)))
        if c.embeds is None:
            raise ValueError("this teacher is text-conditional: cond must be a Cond with embeds (from sample_cond)")
        dt = x_in.dtype
        if self.is_sd3:
            out = self.net(hidden_states=x_in, timestep=timestep, encoder_hidden_states=c.embeds.to(dt),
                           pooled_projections=c.pooled.to(dt))
            return out.sample
        kw: dict[str, Any] = {"encoder_hidden_states": c.embeds.to(dt)}
        if self.net.config.get("addition_embed_type") == "text_time":
            kw["added_cond_kwargs"] = {"text_embeds": c.pooled.to(dt), "time_ids": c.added["time_ids"].to(dt)}
        return self.net(x_in, timestep, **kw).sample


class DiTTeacher(LatentTeacherMixin, DiffusersTeacher):
    """Class-conditional latent ``DiTTransformer2DModel`` (+ ``AutoencoderKL``) behind the denoiser contract.

    ``num_classes = num_embeds_ada_norm``; the null class is label ``num_embeds_ada_norm`` (diffusers'
    ``DiTPipeline`` passes ``class_null = 1000`` for its 1000-class models), so guidance is always available.
    ``F`` is the first ``in_channels`` output channels (the learned-sigma channels are dropped, as in the pipeline).
    """

    def __init__(self, net: nn.Module, vae: nn.Module, scheduler_config: dict[str, Any],
                 sigma_data: float | None = None, sigma_min: float | None = None, sigma_max: float | None = None,
                 extra: dict[str, Any] | None = None) -> None:
        shape = self._shape_of(net)
        k = int(net.config.num_embeds_ada_norm)
        super().__init__(net, scheduler_config, null_class=k, sigma_data=sigma_data, sigma_min=sigma_min,
                         sigma_max=sigma_max, extra={**self.latent_extra(vae, shape), **(extra or {})})
        self.vae = vae.eval().requires_grad_(False)
        self.freeze()

    @staticmethod
    def _classes_of(net: nn.Module, null_class: int | None) -> int | None:
        return int(net.config.num_embeds_ada_norm)

    def _net(self, x_in: Tensor, timestep: Tensor, cond: CondLike) -> Tensor:
        labels = cond_labels(cond)
        if labels is None:
            labels = torch.full((x_in.shape[0],), self.null_class, device=x_in.device, dtype=torch.long)
        out = self.net(x_in, timestep=timestep, class_labels=labels.long()).sample
        return out[:, : x_in.shape[1]]


# ---------------------------------------------------------------------------------------------------------------
# Prompt embeddings: computed once by the pipeline's encode_prompt, cached on disk
# ---------------------------------------------------------------------------------------------------------------
