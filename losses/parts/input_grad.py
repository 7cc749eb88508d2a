"""Denoisers differentiated with respect to their *input* only, for losses whose generator gradient flows through
``x_t`` into the teacher and the fake score (SiD arXiv:2404.04057, SIM arXiv:2410.16794): their parameters stay
constants of the generator phase (the caller wraps the call in :func:`losses.parts.no_param_grad`).

:class:`~losses.parts.fake_score.ResidualFakeScore` evaluates its teacher base under ``no_grad`` (it is a constant of
the fake's parameters), which would also cut the base's input Jacobian; :func:`fake_denoise_with_input_grad` restores
it with a straight-through term whose forward value is exactly zero.
"""

from __future__ import annotations

from torch import Tensor, nn

from .fake_score import ResidualFakeScore

__all__ = ["fake_denoise_with_input_grad"]


def fake_denoise_with_input_grad(fake: nn.Module, x: Tensor, sigma: Tensor, cond: Tensor | None = None,
                                 base: Tensor | None = None) -> Tensor:
    """``fake.denoise(x, sigma, cond)``, differentiable with respect to ``x`` through the whole denoiser.

    For a residual fake ``D = D_teacher + c_out F`` the teacher's input Jacobian is added back as
    ``base - sg(base)`` (value 0, gradient that of ``D_teacher``), with ``base`` the teacher's output at ``x`` (at the
    fake's guidance) computed by the caller with grad, or computed here when ``None``. Other fakes are called as is.

    Args: ``x: [B, ...]``, ``sigma: [B]``, ``cond: [B] | None``, ``base: [B, ...] | None``. Returns ``[B, ...]``.
    """
    out = fake.denoise(x, sigma, cond)
    if isinstance(fake, ResidualFakeScore):
        if base is None:
            base = fake.teacher(x, sigma, cond, fake.guidance)
        base = base.to(out.dtype)
        out = out + (base - base.detach())
    return out
