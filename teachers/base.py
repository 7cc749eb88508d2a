"""The teacher contract: a frozen denoiser ``D(x, sigma, cond=None, guidance=1.0) -> x0_hat`` with metadata.

Every teacher is an ``nn.Module`` in ``eval()`` mode with ``requires_grad_(False)``. Subclasses implement
:meth:`Teacher.denoise` (one network forward, no guidance); :meth:`Teacher.forward` adds classifier-free guidance
``D_w = D_u + w (D_c - D_u)`` (= ``D_c + (w - 1)(D_c - D_u)``), which costs a second ``denoise`` call, and that second
call is what :func:`distill.core.nfe.count_nfe` counts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

from distill.core.cond import CondLike, split_guidance
from distill.core.conversions import append_dims, as_sigma

__all__ = ["Denoiser", "Teacher", "TeacherInfo"]


@runtime_checkable
class Denoiser(Protocol):
    """Anything callable as ``D(x, sigma, cond=None) -> x0_hat`` (``x: [B, ...]``, ``sigma: [B]``)."""

    def __call__(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor: ...


@dataclass
class TeacherInfo:
    """Metadata every teacher carries (and every checkpoint records)."""

    data_shape: tuple[int, ...]
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    num_classes: int | None = None  # class-conditional if not None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["data_shape"] = list(self.data_shape)
        return d


class Teacher(nn.Module):
    """Base class of frozen teachers. Subclasses set ``self.info`` and implement :meth:`denoise`."""

    info: TeacherInfo

    def __init__(self, info: TeacherInfo) -> None:
        super().__init__()
        self.info = info

    # -- metadata shortcuts ---------------------------------------------------------------------------------
    @property
    def data_shape(self) -> tuple[int, ...]:
        return tuple(self.info.data_shape)

    @property
    def sigma_min(self) -> float:
        return self.info.sigma_min

    @property
    def sigma_max(self) -> float:
        return self.info.sigma_max

    @property
    def sigma_data(self) -> float:
        return self.info.sigma_data

    @property
    def num_classes(self) -> int | None:
        return self.info.num_classes

    @property
    def class_probs(self) -> Tensor | None:
        """Class frequencies of a class-conditional teacher's data (``[num_classes]``), or ``None`` for uniform.
        Data-free training and evaluation draw labels from them."""
        return None

    @property
    def conditional(self) -> bool:
        """Whether the teacher is conditional (students trained data-free on it get a ``cond`` per sample from
        :meth:`sample_cond`): class-conditional by default; text-conditional teachers override it."""
        return bool(self.num_classes)

    @property
    def latent(self) -> bool:
        """Whether the teacher denoises in a latent space (``info.extra["latent"]``); :meth:`decode` maps its samples
        to pixels."""
        return bool(self.info.extra.get("latent", False))

    @property
    def pixel_shape(self) -> tuple[int, ...]:
        """Shape of one *decoded* sample (``info.extra["pixel_shape"]``; ``data_shape`` for pixel-space teachers)."""
        return tuple(self.info.extra.get("pixel_shape", self.info.data_shape))

    def native_sigmas(self) -> Tensor | None:
        """The teacher's native (training) noise levels, descending, or ``None`` for continuous-time teachers."""
        return None

    # -- conditioning and decoding hooks ----------------------------------------------------------------------
    def sample_cond(self, n: int, generator: torch.Generator | None = None,
                    device: torch.device | str | None = None) -> CondLike:
        """``n`` draws of the conditioning the teacher is distilled and evaluated on (data-free training batches,
        evaluation, sample grids all call this; nobody else draws labels or prompts).

        Default: ``None`` for an unconditional teacher; for a class-conditional one ``[n]`` labels from
        :attr:`class_probs` (``torch.multinomial`` with replacement) or uniform (``torch.randint``), drawn on the CPU
        from ``generator`` (so the values do not depend on the device), then moved to ``device``. Text-conditional
        teachers return a :class:`distill.core.cond.Cond` (:mod:`teachers.latent`)."""
        if not self.num_classes:
            return None
        probs = self.class_probs
        if probs is not None:
            lab = torch.multinomial(probs.detach().double().cpu(), n, replacement=True, generator=generator)
        else:
            lab = torch.randint(0, self.num_classes, (n,), generator=generator)
        return lab if device is None else lab.to(device)

    def decode(self, x: Tensor) -> Tensor:
        """Samples ``[B, *data_shape]`` -> pixels ``[B, *pixel_shape]`` in ``[-1, 1]``: the identity for pixel-space
        teachers; a latent teacher's VAE decoder. Used by evaluation (FID features), sample grids and ``distill
        sample`` only; training never decodes."""
        return x

    # -- the contract ---------------------------------------------------------------------------------------
    def freeze(self) -> Teacher:
        self.eval()
        self.requires_grad_(False)
        return self

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """One network evaluation. ``cond=None`` means unconditional. Args: ``x: [B, ...]``, ``sigma: [B]``."""
        raise NotImplementedError

    def null_cond(self, cond: Tensor) -> Tensor | None:
        """The unconditional counterpart of ``cond`` used by classifier-free guidance (default: ``None``)."""
        return None

    def check_input(self, x: Tensor) -> None:
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(
                f"{type(self).__name__} expects inputs of shape [B, {', '.join(map(str, self.data_shape))}], "
                f"got {list(x.shape)}"
            )

    def forward(
        self, x: Tensor, sigma: Tensor | float, cond: CondLike = None, guidance: float | Tensor = 1.0
    ) -> Tensor:
        """``D(x, sigma, cond)`` with classifier-free guidance weight ``guidance`` (1 = none), or the per-sample
        scale ``cond.guidance: [B]`` that a guidance-conditioned batch carries (:mod:`distill.core.cond`; giving
        both is an error). A tensor scale always costs the second pass, even where it is 1."""
        sigma = as_sigma(sigma, x)
        cond, guidance = split_guidance(cond, guidance)
        if cond is None or (not isinstance(guidance, Tensor) and guidance == 1.0):
            return self.denoise(x, sigma, cond)
        d_c = self.denoise(x, sigma, cond)
        d_u = self.denoise(x, sigma, self.null_cond(cond))
        w = append_dims(guidance.to(d_c), x.ndim) if isinstance(guidance, Tensor) else guidance
        return d_u + w * (d_c - d_u)

    def sample_noise(
        self, n: int, *, generator: torch.Generator | None = None, device: torch.device | str | None = None
    ) -> Tensor:
        """Standard normal noise of the teacher's data shape, ``[n, *data_shape]`` (samplers scale it by sigma_max)."""
        return torch.randn((n, *self.data_shape), generator=generator, device=device)
