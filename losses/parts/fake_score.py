"""The fake score: a denoiser of the *generator's* current distribution, trained by denoising score matching on
detached generator samples (DMD arXiv:2311.18828 §3.2 eq. 6; DMD2 arXiv:2405.14867 §3, §4.1).

Distribution-matching losses (DMD/DMD2, SiD, SIM, f-distill) compare it with the teacher (the real score). Three
constructions (:data:`FAKE_INITS`):

* ``"teacher"``: a trainable copy of the teacher's network (DMD2's choice: same parameterisation, and the two
  networks' errors cancel in ``mu_fake - mu_real`` while the generator is close to the teacher);
* ``"fresh"``: an EDM-preconditioned MLP (a fresh generator-kind student, whose ``denoise(x, sigma)`` is
  ``c_skip x + c_out F(c_in x, c_noise)``), for low-dimensional teachers without a network;
* ``"residual"``: the teacher plus a zero-initialised MLP correction, :class:`ResidualFakeScore`.

A ``"teacher"`` fake may be a **LoRA critic** (``lora``: a :mod:`students.lora` spec, the losses' ``fake_lora``): the
copy shares the teacher's frozen weights (no second copy of the network) and trains only peft adapters, whose
``B = 0`` start makes it exactly the teacher at init; its base is rebuilt from the teacher, never checkpointed
(``rebuilt_state_keys``, as for LoRA students).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from distill.core.cond import cond_guidance
from distill.core.conversions import append_dims
from distill.core.precond import edm_scalings
from distill.core.registry import ConfigError
from students import build_student
from students.lora import add_lora, check_lora_spec, lora_param_names

from .functional import dsm_loss

__all__ = ["FAKE_INITS", "ResidualFakeScore", "build_fake_score", "check_fake_config", "fake_dsm_loss"]

FAKE_INITS = ("teacher", "fresh", "residual")


class ResidualFakeScore(nn.Module):
    """Fake score for teachers without a network: the teacher plus a zero-initialised, trainable MLP correction,
    ``D_fake(x, sigma) = D_teacher(x, sigma) + c_out(sigma) F(c_in x, c_noise)``.

    A fresh network for an exact (analytic) teacher has no error cancellation with it: its approximation error enters
    the DMD gradient in full, and on the ring it is as large as the structure being matched (it undoes a good
    generator). Learning only the *difference* from the teacher restores the cancellation: at initialisation
    ``mu_fake = mu_real`` exactly, and the correction's error scales with the generator's actual mismatch.

    Args:
        teacher: the frozen teacher (held by reference: not a submodule, so not in the loss's state).
        correction: an EDM-preconditioned MLP denoiser (a fresh generator-kind student); its output layer is zeroed.
        guidance: the teacher's guidance weight (the fake then starts at the guided ``mu_real``).
    """

    def __init__(self, teacher: nn.Module, correction: nn.Module, guidance: float = 1.0) -> None:
        super().__init__()
        self.__dict__["teacher"] = teacher
        self.correction = correction
        self.guidance = guidance
        out = correction.net.mlp[-1]
        nn.init.zeros_(out.weight)
        nn.init.zeros_(out.bias)

    def denoise(self, x: Tensor, sigma: Tensor, cond: Tensor | None = None) -> Tensor:
        """``x: [B, ...]``, ``sigma: [B]``, ``cond: [B] | None`` -> ``[B, ...]``."""
        c_skip = edm_scalings(sigma, self.correction.sigma_data)[0]
        # correction.denoise = c_skip x + c_out F; keep only the c_out F part (computed first, so a GAN feature hook
        # inside the MLP stops the pass before the teacher is evaluated)
        delta = self.correction.denoise(x, sigma, cond) - append_dims(c_skip, x.ndim) * x
        with torch.no_grad():  # the teacher is a constant of the fake's parameters
            base = self.teacher(x, sigma, cond, self.guidance).to(x.dtype)
        return base + delta


def check_fake_config(owner: str, init: str, hidden: int, depth: int, lora: Any = None) -> dict[str, Any] | None:
    """One-line :class:`ConfigError` for an unknown ``fake_init``, a bad MLP size or a bad ``fake_lora`` spec;
    returns the completed LoRA spec (``None`` without one)."""
    if init not in FAKE_INITS:
        raise ConfigError(f"{owner}: unknown fake_init {init!r}; valid: {', '.join(FAKE_INITS)}")
    if hidden < 1 or depth < 1:
        raise ConfigError(f"{owner}: fake_hidden and fake_depth must be >= 1, got {hidden}, {depth}")
    if lora is None:
        return None
    if init != "teacher":
        raise ConfigError(f"{owner}: fake_lora puts adapters on the teacher's network; it needs fake_init='teacher', "
                          f"got {init!r}")
    return check_lora_spec(dict(lora) if hasattr(lora, "items") else lora, owner=f"{owner} fake")


def build_fake_score(init: str, teacher: nn.Module, device: torch.device, dtype: torch.dtype, *, hidden: int = 256,
                     depth: int = 4, guidance: float = 1.0, owner: str = "fake score",
                     lora: dict[str, Any] | None = None) -> nn.Module:
    """A trainable fake score with ``denoise(x [B, ...], sigma [B], cond) -> [B, ...]``, in ``train()`` mode.

    Args:
        init: one of :data:`FAKE_INITS`.
        teacher: the frozen teacher (copied for ``"teacher"``, referenced by ``"residual"``).
        device, dtype: the run's (a teacher copy keeps the teacher's dtype).
        hidden, depth: the MLP's width and number of hidden layers (``"fresh"``, ``"residual"``).
        guidance: the teacher's guidance weight (``"residual"``).
        owner: the loss's name, for error messages.
        lora: a LoRA spec (``"teacher"`` only): a LoRA critic on the teacher's shared, frozen network.
    """
    if init == "teacher":
        if not any(True for _ in teacher.parameters()):
            raise ConfigError(f"{owner}: fake_init='teacher' copies the teacher's network, but this "
                              f"{type(teacher).__name__} has none (an analytic teacher); use fake_init='fresh'")
        if lora is not None:
            if not hasattr(teacher, "net"):
                raise ConfigError(f"{owner}: fake_lora needs a teacher with a network (.net), got "
                                  f"{type(teacher).__name__}")
            # share the teacher's (frozen) parameters instead of copying them; adapters are the only new tensors
            fake = copy.deepcopy(teacher, {id(p): p for p in teacher.parameters()}).to(device=device)
            add_lora(fake.net, check_lora_spec(lora, owner=f"{owner} fake"))
            base = frozenset(f"net.{n}" for n in lora_param_names(fake.net)[1])
            fake.frozen_state_keys = fake.rebuilt_state_keys = base
            return fake.train()
        fake = copy.deepcopy(teacher).to(device=device)
        fake.requires_grad_(True)
        return fake.train()
    if init not in ("fresh", "residual"):
        raise ConfigError(f"{owner}: unknown fake_init {init!r}; valid: {', '.join(FAKE_INITS)}")
    mlp = build_student("generator", teacher, init="fresh", hidden=hidden, depth=depth)
    fake = ResidualFakeScore(teacher, mlp, guidance) if init == "residual" else mlp
    return fake.to(device=device, dtype=dtype).train()


def fake_dsm_loss(fake: nn.Module, x: Tensor, sigma: Tensor, noise: Tensor, cond: Tensor | None,
                  sigma_data: float) -> Tensor:
    """The critic's fake-score loss: EDM-weighted x0 DSM on *detached* generator samples (DMD eq. 6 in EDM's
    weighting), so the fake score learns the generator's current distribution and the generator gets no gradient.

    Args:
        fake: the fake score (``denoise``).
        x: ``[B, ...]`` generator samples (detached here).
        sigma: ``[B]`` noise levels; noise: ``[B, ...]`` standard normal; cond: ``[B]`` labels or ``None``.
        sigma_data: the teacher's data std (EDM weight).
    Returns:
        ``[B]`` per-sample losses.
    """
    check_single_guidance(cond)
    x = x.detach()
    x_t = x + append_dims(sigma, x.ndim) * noise
    return dsm_loss(fake.denoise(x_t, sigma, cond), x, sigma, sigma_data)


def check_single_guidance(cond: Any) -> None:
    """Refuse a batch whose samples carry *different* guidance scales (``data.guidance: [lo, hi]`` with lo < hi).
    A fake score has no guidance input (a teacher copy reads only the labels, a fresh MLP rejects the scale), so it
    would learn the generator's samples mixed over w while the teacher's score is taken at each sample's own w:
    distribution matching against the wrong target. One scale (``data.guidance: [w, w]``) has no such mismatch.
    The check reads the scales on the host (one small sync per critic step, only for guidance-carrying batches)."""
    w = cond_guidance(cond)
    if w is not None and w.numel() > 1 and bool((w != w.reshape(-1)[0]).any()):
        raise ConfigError("a fake score has no guidance input, so it cannot follow a range of guidance scales "
                          "(data.guidance: [lo, hi] with lo < hi); use one scale, data.guidance: [w, w]")
