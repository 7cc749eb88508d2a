"""DMD2's GAN head (arXiv:2405.14867 §4.3, eqs. 5-6): a discriminator on the fake score's features, telling noised
real samples from noised generated ones, trained with the fake score in the critic phase; the generator gets the
non-saturating loss through the (frozen) fake score's encoder.

* :class:`FeatureTap` captures a module's output (or input) during a forward pass and stops the pass there;
* :func:`feature_module` picks the tapped module: a UNet's bottleneck ``mid_block`` or an MLP's last hidden layer;
* :class:`GANHead` maps those features to one logit per sample; :func:`build_gan_head` sizes it by a probe pass;
* :func:`gan_generator_loss`, :func:`gan_critic_loss` are the non-saturating losses (Goodfellow et al. 2014);
* :func:`no_param_grad` lets gradients flow through a module to its input without touching its parameters.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.core.registry import ConfigError

__all__ = ["FeatureTap", "GANHead", "feature_module", "build_gan_head", "gan_generator_loss", "gan_critic_loss",
           "gan_critic_terms", "noised_logits", "no_param_grad"]


class _FeaturesReady(Exception):
    """Raised by a feature hook to stop a forward pass once the features it needs exist (saves the decoder)."""


class FeatureTap:
    """Capture one module's output (or, with ``pre=True``, its input) during a forward pass.

    :meth:`grab` runs a function and returns the captured tensor, aborting the rest of the forward pass; ordinary
    calls are untouched (the hook only acts while a grab is in progress).
    """

    def __init__(self, module: nn.Module, pre: bool) -> None:
        self.active = False
        self.value: Tensor | None = None
        if pre:
            module.register_forward_pre_hook(self._pre_hook)
        else:
            module.register_forward_hook(self._hook)

    def _store(self, t: Tensor) -> None:
        if self.active:
            self.value = t
            raise _FeaturesReady

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self._store(args[0])

    def _hook(self, module: nn.Module, args: tuple[Any, ...], out: Any) -> None:
        self._store(out[0] if isinstance(out, tuple) else out)

    def grab(self, fn: Callable[..., Any], *args: Any) -> Tensor:
        """``fn(*args)`` up to the tapped module; returns its ``[B, ...]`` output (input)."""
        self.active, self.value = True, None
        try:
            fn(*args)
        except _FeaturesReady:
            pass
        finally:
            self.active = False
        if self.value is None:
            raise RuntimeError("the GAN feature hook never fired: the forward pass did not reach the tapped module")
        out, self.value = self.value, None
        return out


def feature_module(net: nn.Module, owner: str = "GAN head") -> tuple[nn.Module, bool]:
    """``(module, pre)``: the first submodule's ``mid_block`` (a UNet's bottleneck; tap its output, ``pre=False``),
    else the last ``nn.Linear`` (an MLP's output layer; tap its input, the last hidden activations, ``pre=True``)."""
    linear = None
    for _, m in net.named_modules():
        mid = getattr(m, "mid_block", None)
        if isinstance(mid, nn.Module):
            return mid, False
        if isinstance(m, nn.Linear):
            linear = m
    if linear is not None:
        return linear, True
    raise ConfigError(f"{owner}: the GAN head needs a fake score with a UNet mid_block or an MLP; got "
                      f"{type(net).__name__}")


def _groups(c: int) -> int:
    """GroupNorm groups: at most 32 (DMD2's head), but at least 4 channels per group on narrow maps."""
    g = math.gcd(c, 32)
    while g > 1 and c // g < 4:
        g //= 2
    return g


class GANHead(nn.Module):
    """Discriminator head on fake-score features: ``[B, C, h, w] -> [B]`` logits, or ``[B, C] -> [B]``.

    DMD2 (§4.3) stacks 4x4 stride-2 convs with GroupNorm and SiLU on the fake UNet's bottleneck down to 4x4 and ends
    in a stride-4 conv. The project's UNets have tiny bottlenecks (an 8x8 input reaches 2x2), so: stride-2 blocks
    while the map is larger than 4x4, then a 3x3 conv block, global average pooling and a linear logit (the same
    receptive field at 4x4, and valid below it). Vector features (an MLP's last hidden layer) get a linear logit.
    """

    def __init__(self, feature_shape: Sequence[int]) -> None:
        super().__init__()
        feature_shape = tuple(feature_shape)
        if len(feature_shape) == 1:
            self.net: nn.Module = nn.Linear(feature_shape[0], 1)
        elif len(feature_shape) == 3:
            c, h, _ = feature_shape
            layers: list[nn.Module] = []
            while h > 4:
                layers += [nn.Conv2d(c, c, 4, stride=2, padding=1), nn.GroupNorm(_groups(c), c), nn.SiLU()]
                h //= 2
            layers += [nn.Conv2d(c, c, 3, padding=1), nn.GroupNorm(_groups(c), c), nn.SiLU()]
            layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1)]
            self.net = nn.Sequential(*layers)
        else:
            raise ValueError(f"GANHead takes [C] or [C, H, W] features, got feature shape {list(feature_shape)}")
        self.feature_shape = feature_shape

    def forward(self, feats: Tensor) -> Tensor:
        return self.net(feats).reshape(feats.shape[0])


@torch.no_grad()
def build_gan_head(fake: nn.Module, data_shape: Sequence[int], num_classes: int | None, device: torch.device,
                   dtype: torch.dtype, owner: str = "GAN head") -> tuple[GANHead, FeatureTap]:
    """Tap ``fake``'s features (:func:`feature_module`) and size a :class:`GANHead` for them by one deterministic
    probe (2 zero samples at sigma 1, label 0 for a conditional fake). Returns ``(head on device/dtype, tap)``."""
    module, pre = feature_module(fake, owner)
    tap = FeatureTap(module, pre)
    x = torch.zeros((2, *data_shape), device=device, dtype=dtype)
    cond = None if num_classes is None else torch.zeros(2, dtype=torch.long, device=device)
    feats = tap.grab(fake.denoise, x, torch.ones(2, device=device, dtype=dtype), cond)
    return GANHead(feats.shape[1:]).to(device=device, dtype=dtype), tap


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``softplus(-D(x_fake)) = -log sigmoid(D)`` (DMD2 eq. 6). ``[B]`` -> ``[B]``."""
    return F.softplus(-logits_fake)


def gan_critic_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """Logistic classifier loss ``E softplus(D(fake)) + E softplus(-D(real))`` (DMD2 eq. 5); its optimal logit is
    ``log p_real / p_fake``. Args: ``logits_fake: [B]``, ``logits_real: [B']`` (sizes may differ). Returns a scalar."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


@contextmanager
def no_param_grad(*modules: nn.Module) -> Iterator[None]:
    """Let gradients flow *through* ``modules`` to their inputs without building any for their parameters.

    DMD2's generator GAN term back-propagates through the fake score's encoder and the head into the generator, but
    those are trained only in the critic phase; freezing them here keeps the student phase from touching them (and
    saves their weight gradients). ``requires_grad`` flags are restored on exit.
    """
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


def noised_logits(head: nn.Module, tap: FeatureTap, fake: nn.Module, x: Tensor, sigma: Tensor, batch: Any) -> Tensor:
    """GAN logits ``[B]`` of ``x: [B, ...]`` re-noised to ``sigma: [B]`` (noise drawn through the batch), on the fake
    score's tapped features (DMD2 §4.3; SiDA)."""
    x_t = x + sigma.reshape(-1, *[1] * (x.ndim - 1)) * batch.randn_like(x)
    return head(tap.grab(fake.denoise, x_t, sigma, batch.labels))


def gan_critic_terms(owner: str, logits: Callable[[Tensor, Any], Tensor], fake: Tensor, batch: Any,
                     device: torch.device, dtype: torch.dtype) -> tuple[Tensor, dict[str, Tensor]]:
    """The critic's diffusion-GAN classifier on noised generated vs noised real samples (DMD2 eq. 5; SiDA):
    ``(loss, logged terms)``.

    Args:
        owner: the loss's name, for the error when the batch carries no real data.
        logits: ``(x [B, ...], batch) -> [B]`` logits of ``x`` re-noised by the loss (its sigma density, its draws);
            called on ``fake`` first, then on ``batch.data``, so the batch's draws keep their order.
        fake: ``[B, ...]`` detached generated samples.
        batch: the phase's :class:`losses.base.Batch` (``batch.data`` the real samples).
    """
    if batch.data is None:
        raise ValueError(f"{owner}: gan_weight > 0 needs real data (batch.data) for the critic's classifier")
    logit_f = logits(fake, batch)
    logit_r = logits(batch.data.to(device=device, dtype=dtype), batch)
    loss = gan_critic_loss(logit_f, logit_r)
    return loss, {"gan_d": loss.detach(), "d_real": torch.sigmoid(logit_r).mean().detach(),
                  "d_fake": torch.sigmoid(logit_f).mean().detach()}
