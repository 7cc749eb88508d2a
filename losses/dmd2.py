"""DMD2: distribution matching distillation with a two-time-scale fake score and an optional GAN head.

* "One-step Diffusion with Distribution Matching Distillation", Yin et al. 2023, arXiv:2311.18828 (DMD).
* "Improved Distribution Matching Distillation for Fast Image Synthesis", Yin et al. 2024, arXiv:2405.14867 (DMD2).

A generator ``G`` (a one-step or few-step student) is trained so that its noised sample distribution ``q_sigma``
matches the teacher's ``p_sigma`` in reverse KL, averaged over noise levels. The gradient of ``KL(q_sigma || p_sigma)``
with respect to a generated sample is ``s_fake - s_real``; in x0 units (Tweedie, ``s = (D - x) / sigma^2``) it is
``(mu_fake - mu_real) / sigma^2``, and DMD replaces the ``1/sigma^2`` by a per-sample normaliser
``1 / mean|x - mu_real|`` (DMD eq. 8 / DMD2 §4; methods.md §2.0.4, §2.5). ``mu_real`` is the frozen teacher,
``mu_fake`` a *fake score* network trained by denoising score matching on the generator's current samples.

Two phases (methods.md §2.5):

* ``critic``: fit the fake score to detached generator samples (EDM-weighted x0 DSM), plus, with a GAN head, a
  non-saturating classifier between noised real and noised generated samples on the fake score's bottleneck
  features (weight ``gan_critic_weight``);
* ``student``: push the generator's samples along ``-g`` with the gradient-injection surrogate, plus
  ``gan_weight * softplus(-logit)`` on a re-noised generated sample.

DMD2's two-time-scale update rule (TTUR) runs the critic ``critic_updates`` times per generator update (5 on
ImageNet and SDXL), so the fake score tracks the moving generator; a stale fake score is DMD's main failure mode.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distill.conversions import append_dims
from distill.registry import ConfigError
from distill.samplers import sample_heun
from distill.schedules import karras_sigmas, sample_discrete_index_sigma, sample_lognormal_sigma
from students import build_student, edm_scalings

from . import register_loss
from .base import Batch, DistillLoss

__all__ = [
    "DMD2",
    "GANHead",
    "ResidualFakeScore",
    "teacher_ode_pairs",
    "dmd_gradient",
    "gradient_injection_loss",
    "edm_loss_weight",
    "dsm_loss",
    "gan_generator_loss",
    "gan_critic_loss",
]

SIGMA_DENSITIES = ("grid", "lognormal")
FAKE_INITS = ("teacher", "fresh", "residual")


# ---------------------------------------------------------------------------------------------------------------
# Pure math
# ---------------------------------------------------------------------------------------------------------------


def _mean_dims(x: Tensor) -> Tensor:
    """Mean over every dim but the batch: ``[B, ...] -> [B]``."""
    return x.reshape(x.shape[0], -1).mean(dim=1)


def dmd_gradient(x: Tensor, mu_real: Tensor, mu_fake: Tensor, eps: float = 1e-5) -> Tensor:
    """The normalised distribution-matching gradient ``g = (mu_fake - mu_real) / mean_dims|x - mu_real|``.

    DMD (arXiv:2311.18828) eq. 8 with the per-sample normaliser of DMD2's code (methods.md §2.0.4, §2.5 step 4):
    ``g`` is the reverse-KL gradient w.r.t. the clean sample ``x``, up to a positive per-sample weight; it is exactly
    zero wherever the fake and real denoisers agree, i.e. when the generator matches the teacher.

    Args:
        x: ``[B, ...]`` clean generated samples (detached).
        mu_real: ``[B, ...]`` teacher denoiser at the noised sample.
        mu_fake: ``[B, ...]`` fake-score denoiser at the same noised sample.
        eps: floor of the normaliser, so a sample the teacher already reproduces exactly gives no 0/0.
    Returns:
        ``g: [B, ...]``, with NaN/Inf replaced by finite values (a single bad row must not poison the batch).
    """
    norm = _mean_dims((x - mu_real).abs()).clamp_min(eps)
    return torch.nan_to_num((mu_fake - mu_real) / append_dims(norm, x.ndim))


def gradient_injection_loss(x: Tensor, g: Tensor) -> Tensor:
    """Surrogate whose gradient w.r.t. ``x`` is ``g / x.numel()``: ``0.5 * mean((x - sg(x - g))^2)``.

    methods.md §2.0.5 (DMD2 code): the target ``sg(x - g)`` carries no gradient, so back-propagating this scalar
    pushes ``x`` along ``-g`` through the generator without differentiating the teacher or the fake score. The value
    itself (``0.5 * mean(g^2)``) says nothing about progress; log the norm of ``g`` instead.

    Args:
        x: ``[B, ...]`` generated samples (with grad).
        g: ``[B, ...]`` the gradient to inject (treated as a constant).
    Returns:
        scalar loss.
    """
    return 0.5 * F.mse_loss(x, (x - g).detach(), reduction="mean")


def edm_loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM's x0-loss weight ``lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma sigma_d)^2``.

    Karras et al. 2022 (arXiv:2206.00364) Table 1: with this weight the preconditioned network's regression target
    has unit variance at every noise level. Args: ``sigma: [B]``. Returns ``[B]``.
    """
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def dsm_loss(x0_hat: Tensor, x0: Tensor, sigma: Tensor, sigma_data: float) -> Tensor:
    """Per-sample EDM-weighted denoising score matching in x0 units: ``lambda(sigma) * mean_dims((x0_hat - x0)^2)``.

    Minimised over denoisers by the posterior mean ``E[x0 | x_sigma]`` (Vincent 2011; EDM eq. 2), which is why it
    trains the fake score of the generator's distribution. Args: ``x0_hat, x0: [B, ...]``, ``sigma: [B]``.
    Returns ``[B]``.
    """
    return edm_loss_weight(sigma, sigma_data) * _mean_dims((x0_hat - x0) ** 2)


def gan_generator_loss(logits_fake: Tensor) -> Tensor:
    """Non-saturating generator loss ``softplus(-D(x_fake)) = -log sigmoid(D)`` (Goodfellow et al. 2014; DMD2 eq. 6).

    Args: ``logits_fake: [B]``. Returns ``[B]``.
    """
    return F.softplus(-logits_fake)


def gan_critic_loss(logits_fake: Tensor, logits_real: Tensor) -> Tensor:
    """Logistic classifier loss ``E softplus(D(fake)) + E softplus(-D(real))`` (DMD2 eq. 5); its optimal logit is
    ``log p_real / p_fake``. Args: ``logits_fake: [B]``, ``logits_real: [B']`` (sizes may differ). Returns a scalar."""
    return F.softplus(logits_fake).mean() + F.softplus(-logits_real).mean()


@torch.no_grad()
def teacher_ode_pairs(teacher: nn.Module, n: int, guidance: float = 1.0, device: torch.device | None = None,
                      dtype: torch.dtype = torch.float32, nfe: int = 35, chunk: int = 1000
                      ) -> tuple[Tensor, Tensor | None, Tensor]:
    """``n`` (noise, label, teacher ODE output) triples: Heun with ``nfe`` evaluations (``(nfe + 1) / 2`` Karras
    steps; 35 -> 18) from ``sigma_max z``.

    DMD (arXiv:2311.18828 §3.3) regresses the generator onto such pairs; DMD2 (arXiv:2405.14867 §5) uses a short
    regression on 10k of them to warm-start its one-step SDXL generator. Labels are drawn uniformly for conditional
    teachers (``None`` otherwise). Returns ``z: [n, *shape]``, ``cond: [n] | None``, ``x0: [n, *shape]``.
    """
    device = device if device is not None else DMD2._device(teacher)
    k = getattr(teacher, "num_classes", None)
    z = torch.randn((n, *teacher.data_shape), device=device, dtype=dtype)
    cond = None if k is None else torch.randint(k, (n,), device=device)
    sigmas = karras_sigmas((nfe + 1) // 2, teacher.sigma_min, teacher.sigma_max)
    outs = []
    for a in range(0, n, chunk):
        c = None if cond is None else cond[a:a + chunk]
        outs.append(sample_heun(lambda x, s, c_: teacher(x, s, c_, guidance), z[a:a + chunk], sigmas, c))
    return z, cond, torch.cat(outs).to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Networks owned by the loss
# ---------------------------------------------------------------------------------------------------------------


class _FeaturesReady(Exception):
    """Raised by a feature hook to stop a forward pass once the features it needs exist (saves the decoder)."""


class _FeatureTap:
    """Capture one module's output (or, with ``pre=True``, its input) during a forward of ``net``.

    :meth:`grab` runs ``net`` and returns the captured tensor, aborting the rest of the forward pass; ordinary calls
    of ``net`` are untouched (the hook only acts while a grab is in progress).
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
        self.active, self.value = True, None
        try:
            fn(*args)
        except _FeaturesReady:
            pass
        finally:
            self.active = False
        if self.value is None:
            raise RuntimeError("the GAN feature hook never fired: the fake score's forward did not reach it")
        out, self.value = self.value, None
        return out


def _groups(c: int) -> int:
    """GroupNorm groups: at most 32 (DMD2's head), but at least 4 channels per group on narrow maps."""
    g = math.gcd(c, 32)
    while g > 1 and c // g < 4:
        g //= 2
    return g


class GANHead(nn.Module):
    """Discriminator head on fake-score features: ``[B, C, h, w] -> [B]`` logits, or ``[B, C] -> [B]``.

    DMD2 (arXiv:2405.14867 §4.3) stacks 4x4 stride-2 convs with GroupNorm and SiLU on the fake UNet's bottleneck
    down to 4x4 and ends in a stride-4 conv. The project's UNets have tiny bottlenecks (an 8x8 input reaches 2x2),
    so: stride-2 blocks while the map is larger than 4x4, then a 3x3 conv block, global average pooling and a linear
    logit (the same receptive field at 4x4, and valid below it). Vector features (an MLP fake score's last hidden
    layer) get a linear logit.
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


class ResidualFakeScore(nn.Module):
    """Fake score for teachers without a network: the teacher plus a zero-initialised, trainable MLP correction,
    ``D_fake(x, sigma) = D_teacher(x, sigma) + c_out(sigma) F(c_in x, c_noise)``.

    DMD2 initialises the fake score as a copy of the teacher so that, while the generator is close to the teacher,
    the two networks' errors cancel in ``mu_fake - mu_real``. A fresh network for an exact (analytic) teacher has no
    such cancellation: its approximation error enters ``g`` in full, and on the ring it is as large as the structure
    being matched (it undoes a good generator). Learning only the *difference* from the teacher restores the
    cancellation: at initialisation ``mu_fake = mu_real`` exactly, and the correction's error scales with the
    generator's actual mismatch.

    Args:
        teacher: the frozen teacher (held by reference: it is not a submodule, so not in the loss's state).
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
        c_skip = edm_scalings(sigma, self.correction.sigma_data)[0]
        # correction.denoise = c_skip x + c_out F; keep only the c_out F part (computed first, so a GAN feature hook
        # inside the MLP stops the pass before the teacher is evaluated)
        delta = self.correction.denoise(x, sigma, cond) - append_dims(c_skip, x.ndim) * x
        with torch.no_grad():  # the teacher is a constant of the fake's parameters
            base = self.teacher(x, sigma, cond, self.guidance).to(x.dtype)
        return base + delta


@contextmanager
def _no_param_grad(module: nn.Module) -> Iterator[None]:
    """Let gradients flow *through* ``module`` to its input without building any for its parameters.

    The generator's GAN term back-propagates through the fake score's encoder into the generator (methods.md §2.5,
    AD), but the fake score is trained only in the critic phase; freezing its parameters here keeps the student
    phase from touching them (and saves their weight gradients).
    """
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, f in flags:
            p.requires_grad_(f)


# ---------------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------------


@register_loss("dmd2")
class DMD2(DistillLoss):
    """Distribution matching distillation (DMD2 without/with its GAN head), phases ``("critic", "student")``.

    Args:
        critic_updates: fake-score (critic) updates per generator update, DMD2's two-time-scale rule (5).
        guidance: classifier-free guidance weight of the *teacher* (``mu_real``) for conditional teachers; random
            class labels are drawn when the batch has none.
        dm_sigma: noise density of the distribution-matching term: ``"grid"`` = uniform over the indices of a
            ``num_levels`` Karras grid of the teacher's sigma range restricted to the fraction ``[t_min, t_max]``
            (DMD2's ``t ~ U[0.02 T, 0.98 T]``), or ``"lognormal"`` (``log sigma ~ N(p_mean, p_std^2)``).
        t_min, t_max: the grid fraction range (0 = sigma_max end, 1 = sigma_min end; the range is symmetric).
        num_levels: size of that Karras grid.
        fake_sigma: noise density of the fake score's DSM loss, ``"lognormal"`` (EDM) or ``"grid"`` (as ``dm_sigma``).
        p_mean, p_std: log-normal parameters (EDM's -1.2, 1.2), used by whichever density is ``"lognormal"``.
        gan_weight: weight of the generator's non-saturating GAN term (0 disables the GAN head entirely).
        gan_critic_weight: weight of the classifier loss in the critic update (DMD2: 1e-2).
        student_sigmas: ``None`` for a one-step generator fed ``sigma_max * z``; a descending list of noise levels
            (e.g. ``[80, 2.0, 0.5]``) for a multi-step generator trained with backward simulation.
        fake_init: ``"teacher"`` (trainable copy of the teacher's network, DMD2's choice), ``"fresh"`` (an
            EDM-preconditioned MLP, for low-dimensional teachers without a network, such as the analytic ones) or
            ``"residual"`` (the teacher plus a zero-initialised MLP correction, :class:`ResidualFakeScore`: the
            network-free analogue of the teacher copy, and what works on the ring).
        fake_hidden, fake_depth: width and number of hidden layers of the fresh MLP (or residual correction).
        dm_eps: floor of the per-sample DMD normaliser.
        regression_steps: iterations of warm-start regression before distribution matching: the generator is fit to
            ``(z, ODE(z))`` pairs of the teacher (DMD v1's regression loss, DMD2's warm start of its one-step SDXL
            model), so it starts from a map that already sends each ``z`` where the teacher does instead of from a
            point that must break symmetry (decisive on the 2-D ring). Only the student phase runs meanwhile.
        regression_pairs: number of pairs cached at :meth:`setup` (Heun of the teacher, with ``guidance``).
        regression_nfe: the Heun sampler's NFE for those pairs (odd; 35 = 18 Karras steps).
        regression_weight: weight of the same regression term added to the distribution-matching loss after the
            warm start (DMD v1's ``lambda_reg``, 0.25 there with LPIPS): it anchors the generator to the teacher's
            noise-to-data map while the noisy DM gradient sharpens it.
        fake_warmup: critic-only iterations after the regression (the fake score fits the warm-started generator
            before the first distribution-matching update).
    """

    phases = ("critic", "student")
    student_kind = "generator"

    def __init__(
        self,
        critic_updates: int = 5,
        guidance: float = 1.0,
        dm_sigma: str = "grid",
        t_min: float = 0.02,
        t_max: float = 0.98,
        num_levels: int = 1000,
        fake_sigma: str = "lognormal",
        p_mean: float = -1.2,
        p_std: float = 1.2,
        gan_weight: float = 0.0,
        gan_critic_weight: float = 1e-2,
        student_sigmas: Sequence[float] | None = None,
        fake_init: str = "teacher",
        fake_hidden: int = 256,
        fake_depth: int = 4,
        dm_eps: float = 1e-5,
        regression_steps: int = 0,
        regression_pairs: int = 10_000,
        regression_nfe: int = 35,
        regression_weight: float = 0.0,
        fake_warmup: int = 0,
    ) -> None:
        super().__init__()
        if int(critic_updates) != critic_updates or critic_updates < 1:
            raise ConfigError(f"dmd2: critic_updates must be an integer >= 1, got {critic_updates!r}")
        if dm_sigma not in SIGMA_DENSITIES or fake_sigma not in SIGMA_DENSITIES:
            bad = dm_sigma if dm_sigma not in SIGMA_DENSITIES else fake_sigma
            raise ConfigError(f"dmd2: unknown sigma density {bad!r}; valid: {', '.join(SIGMA_DENSITIES)}")
        if not 0.0 <= t_min < t_max <= 1.0:
            raise ConfigError(f"dmd2: need 0 <= t_min < t_max <= 1, got t_min={t_min}, t_max={t_max}")
        if num_levels < 2:
            raise ConfigError(f"dmd2: num_levels must be >= 2, got {num_levels}")
        if p_std <= 0:
            raise ConfigError(f"dmd2: p_std must be > 0, got {p_std}")
        if guidance < 0:
            raise ConfigError(f"dmd2: guidance must be >= 0 (1 = no guidance), got {guidance}")
        if gan_weight < 0 or gan_critic_weight < 0:
            raise ConfigError(f"dmd2: GAN weights must be >= 0, got gan_weight={gan_weight}, "
                              f"gan_critic_weight={gan_critic_weight}")
        if fake_init not in FAKE_INITS:
            raise ConfigError(f"dmd2: unknown fake_init {fake_init!r}; valid: {', '.join(FAKE_INITS)}")
        if fake_hidden < 1 or fake_depth < 1:
            raise ConfigError(f"dmd2: fake_hidden and fake_depth must be >= 1, got {fake_hidden}, {fake_depth}")
        for key, val in (("regression_steps", regression_steps), ("fake_warmup", fake_warmup)):
            if int(val) != val or val < 0:
                raise ConfigError(f"dmd2: {key} must be an integer >= 0, got {val!r}")
        if regression_weight < 0:
            raise ConfigError(f"dmd2: regression_weight must be >= 0, got {regression_weight}")
        bad_pairs = int(regression_pairs) != regression_pairs or regression_pairs < 1
        if (regression_steps > 0 or regression_weight > 0) and bad_pairs:
            raise ConfigError(f"dmd2: regression_pairs must be an integer >= 1, got {regression_pairs!r}")
        if int(regression_nfe) != regression_nfe or regression_nfe < 3 or regression_nfe % 2 == 0:
            raise ConfigError(f"dmd2: regression_nfe must be an odd integer >= 3 (Heun: 2N - 1), got "
                              f"{regression_nfe!r}")
        if student_sigmas is not None:
            levels = [float(s) for s in student_sigmas]
            if not levels or any(s <= 0 for s in levels) or any(a <= b for a, b in zip(levels, levels[1:])):
                raise ConfigError(f"dmd2: student_sigmas must be a non-empty strictly descending list of positive "
                                  f"noise levels (e.g. [80, 2.0, 0.5]), got {list(student_sigmas)}")
            student_sigmas = levels
        self.critic_updates = int(critic_updates)
        self.guidance = float(guidance)
        self.dm_sigma, self.fake_sigma = dm_sigma, fake_sigma
        self.t_min, self.t_max, self.num_levels = float(t_min), float(t_max), int(num_levels)
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        self.gan_weight, self.gan_critic_weight = float(gan_weight), float(gan_critic_weight)
        self.student_sigmas = student_sigmas
        self.fake_init, self.fake_hidden, self.fake_depth = fake_init, int(fake_hidden), int(fake_depth)
        self.dm_eps = float(dm_eps)
        self.regression_steps, self.regression_pairs = int(regression_steps), int(regression_pairs)
        self.regression_nfe = int(regression_nfe)
        self.regression_weight = float(regression_weight)
        self.fake_warmup = int(fake_warmup)
        # Real data is needed only by the GAN classifier.
        self.needs_data = self.gan_weight > 0
        self.fake: nn.Module | None = None
        self.gan_head: GANHead | None = None
        self._tap: _FeatureTap | None = None

    @classmethod
    def tiny_config(cls) -> dict[str, Any]:
        """A small, fast configuration for the shared loss contract test (CPU, 8x8 UNet teacher): the GAN head and a
        two-level student are on, so every code path (feature hook, backward simulation) is exercised."""
        return {"critic_updates": 2, "num_levels": 50, "gan_weight": 0.1, "student_sigmas": [80.0, 1.0]}

    def update_every(self) -> dict[str, int]:
        return {"critic": 1, "student": self.critic_updates}

    def phases_for_step(self, step: int) -> list[str]:
        """Regression warm start (student only), then fake-score warm-up (critic only), then the TTUR schedule."""
        if step < self.regression_steps:
            return ["student"]
        if step < self.regression_steps + self.fake_warmup:
            return ["critic"]
        return super().phases_for_step(step - self.regression_steps - self.fake_warmup)

    # -- setup -------------------------------------------------------------------------------------------------
    def setup(self, student: nn.Module, teacher: nn.Module) -> None:
        if self.guidance != 1.0 and getattr(teacher, "num_classes", None) is None:
            raise ConfigError(f"dmd2: guidance={self.guidance} needs a class-conditional teacher; this "
                              f"{type(teacher).__name__} is unconditional (use guidance=1.0)")
        self.fake = self._build_fake(teacher)
        if self.fake_init in ("fresh", "residual"):
            self.fake.to(device=self._device(student), dtype=self._dtype(student))
        self.fake.train()
        self._grid = karras_sigmas(self.num_levels, teacher.sigma_min, teacher.sigma_max, append_zero=False)
        if self.gan_weight > 0:
            module, pre = self._feature_module(self.fake)
            self._tap = _FeatureTap(module, pre)
            with torch.no_grad():
                n = 2
                x = torch.zeros((n, *teacher.data_shape), device=self._device(self.fake))
                sigma = torch.ones(n, device=x.device)
                cond = self._random_labels(teacher, n, x.device)
                feats = self._tap.grab(self.fake.denoise, x, sigma, cond)
            self.gan_head = GANHead(feats.shape[1:]).to(x.device)
        if self.regression_steps > 0 or self.regression_weight > 0:
            z, cond, x0 = teacher_ode_pairs(teacher, self.regression_pairs, self.guidance, self._device(student),
                                            self._dtype(student), nfe=self.regression_nfe)
            # Persistent buffers: a resumed run regresses onto the same pairs.
            self.register_buffer("ode_z", z)
            self.register_buffer("ode_x0", x0)
            self.register_buffer("ode_cond", cond)

    def _build_fake(self, teacher: nn.Module) -> nn.Module:
        if self.fake_init == "teacher":
            if not any(True for _ in teacher.parameters()):
                raise ConfigError(f"dmd2: fake_init='teacher' copies the teacher's network, but this "
                                  f"{type(teacher).__name__} has none (an analytic teacher); use fake_init='fresh'")
            # Same parameterisation and preconditioning as the teacher, so mu_fake = mu_real at initialisation.
            fake = copy.deepcopy(teacher)
            fake.requires_grad_(True)
            return fake
        # A fresh EDM-preconditioned MLP denoiser. A generator student's ``denoise(x, sigma)`` = ``J(x, sigma, 0)``
        # is exactly ``c_skip x + c_out F(c_in x, c_noise)``, so the students package's builder is reused as is.
        mlp = build_student("generator", teacher, init="fresh", hidden=self.fake_hidden, depth=self.fake_depth)
        if self.fake_init == "residual":
            return ResidualFakeScore(teacher, mlp, self.guidance)
        return mlp

    @staticmethod
    def _feature_module(fake: nn.Module) -> tuple[nn.Module, bool]:
        """The module whose output (UNet bottleneck) or input (an MLP's last hidden layer) feeds the GAN head."""
        mid = getattr(getattr(fake, "net", None), "mid_block", None)
        if mid is not None:
            return mid, False
        mlp = getattr(getattr(getattr(fake, "correction", fake), "net", None), "mlp", None)
        if isinstance(mlp, nn.Sequential) and isinstance(mlp[-1], nn.Linear):
            return mlp[-1], True  # the output layer's input = the last hidden activations
        raise ConfigError(f"dmd2: the GAN head needs a fake score with a UNet mid_block or an MLP; got "
                          f"{type(fake).__name__}")

    def phase_parameters(self, phase: str, student: nn.Module) -> list[nn.Parameter]:
        if phase == "student":
            return [p for p in student.parameters() if p.requires_grad]
        if phase == "critic":
            if self.fake is None:
                raise RuntimeError("dmd2: call setup(student, teacher) before asking for critic parameters")
            params = list(self.fake.parameters())
            if self.gan_head is not None:
                params += list(self.gan_head.parameters())
            return params
        raise ValueError(f"dmd2: unknown phase {phase!r}; valid phases: {', '.join(self.phases)}")

    # -- sampling helpers --------------------------------------------------------------------------------------
    @staticmethod
    def _device(module: nn.Module) -> torch.device:
        for t in module.parameters():
            return t.device
        for t in module.buffers():
            return t.device
        return torch.device("cpu")

    @staticmethod
    def _dtype(module: nn.Module) -> torch.dtype:
        for p in module.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.get_default_dtype()

    @staticmethod
    def _random_labels(teacher: nn.Module, n: int, device: torch.device) -> Tensor | None:
        k = getattr(teacher, "num_classes", None)
        return None if k is None else torch.randint(k, (n,), device=device)

    def _sample_sigma(self, density: str, n: int, like: Tensor) -> Tensor:
        """``[n]`` noise levels from ``"grid"`` (DMD2's discrete index range) or ``"lognormal"`` (EDM)."""
        if density == "grid":
            _, sigma = sample_discrete_index_sigma(n, self._grid, self.t_min, self.t_max)
        else:
            lo, hi = float(self._grid[-1]), float(self._grid[0])
            sigma = sample_lognormal_sigma(n, self.p_mean, self.p_std, dtype=torch.float64).clamp(lo, hi)
        return sigma.to(device=like.device, dtype=like.dtype)

    def _generate(self, student: nn.Module, teacher: nn.Module, n: int, cond: Tensor | None,
                  device: torch.device, dtype: torch.dtype) -> Tensor:
        """Generator samples ``[n, *data_shape]``; differentiable iff called with grad enabled.

        One-step: ``G(z) = J(sigma_max z, sigma_max, 0)``. Multi-step (DMD2 §4.5, backward simulation): each row
        picks a level ``k``, the *current* student runs ``k`` jumps from pure noise with fresh re-noising (as at
        sampling time, so training inputs match inference inputs), and only the last jump ``k -> 0`` is graded.
        """
        z = torch.randn((n, *teacher.data_shape), device=device, dtype=dtype)
        levels = self.student_sigmas or [float(teacher.sigma_max)]
        sig = torch.tensor(levels, device=device, dtype=dtype)
        if len(levels) == 1:
            x = sig[0] * z
            return student(x, sig[0].expand(n), torch.zeros(n, device=device, dtype=dtype), cond)
        k = torch.randint(len(levels), (n,), device=device)
        x = sig[0] * z
        with torch.no_grad():
            for j in range(int(k.max())):
                x0 = student(x, sig[j].expand(n), torch.zeros(n, device=device, dtype=dtype), cond)
                renoised = x0 + sig[j + 1] * torch.randn_like(x0)
                x = torch.where(append_dims(k > j, x.ndim), renoised, x)
        return student(x, sig[k], torch.zeros(n, device=device, dtype=dtype), cond)

    def _batch_setup(self, student: nn.Module, teacher: nn.Module, batch: Batch) -> tuple[int, Tensor | None,
                                                                                            torch.device, torch.dtype]:
        device, dtype = self._device(student), self._dtype(student)
        cond = batch.get("cond")
        if batch.get("batch_size") is not None:
            n = int(batch["batch_size"])
        elif batch.get("x0") is not None:
            n = int(batch["x0"].shape[0])
        elif cond is not None:
            n = int(cond.shape[0])
        else:
            raise ValueError("dmd2: the batch must give its size: a 'batch_size', 'x0' or 'cond' entry")
        if cond is None:
            cond = self._random_labels(teacher, n, device)  # conditional teacher, label-free batch
        return n, cond, device, dtype

    def _logits(self, x: Tensor, sigma: Tensor, cond: Tensor | None) -> Tensor:
        assert self._tap is not None and self.gan_head is not None
        return self.gan_head(self._tap.grab(self.fake.denoise, x, sigma, cond))

    # -- the two phases ----------------------------------------------------------------------------------------
    def forward(self, phase: str, student: nn.Module, teacher: nn.Module, batch: Batch, step: int
                ) -> dict[str, Tensor]:
        if self.fake is None:
            raise RuntimeError("dmd2: call setup(student, teacher) before the first step")
        if phase == "critic":
            return self._critic(student, teacher, batch)
        if phase == "student":
            if step < self.regression_steps:
                return self._regression(student, teacher, batch)
            return self._student(student, teacher, batch)
        raise ValueError(f"dmd2: unknown phase {phase!r}; valid phases: {', '.join(self.phases)}")

    def _critic(self, student: nn.Module, teacher: nn.Module, batch: Batch) -> dict[str, Tensor]:
        n, cond, device, dtype = self._batch_setup(student, teacher, batch)
        # The fake score learns the generator's *current* distribution; the generator gets no gradient here.
        with torch.no_grad():
            x = self._generate(student, teacher, n, cond, device, dtype)
        # Fake-score DSM (x0 prediction, EDM weighting)
        sigma = self._sample_sigma(self.fake_sigma, n, x)
        x_t = x + append_dims(sigma, x.ndim) * torch.randn_like(x)
        dsm = dsm_loss(self.fake.denoise(x_t, sigma, cond), x, sigma, float(teacher.sigma_data)).mean()
        out = {"dsm": dsm.detach()}
        loss = dsm
        if self.gan_weight > 0:
            # Diffusion-GAN classifier on noised real vs noised generated samples (DMD2 §4.3)
            real = batch.get("x0")
            if real is None:
                raise ValueError("dmd2: gan_weight > 0 needs real data in batch['x0'] for the critic's classifier")
            real = real.to(device=device, dtype=dtype)
            real_cond = batch.get("cond")
            if real_cond is None:
                real_cond = self._random_labels(teacher, real.shape[0], device)
            s_f = self._sample_sigma(self.dm_sigma, n, x)
            s_r = self._sample_sigma(self.dm_sigma, real.shape[0], x)
            logit_f = self._logits(x + append_dims(s_f, x.ndim) * torch.randn_like(x), s_f, cond)
            logit_r = self._logits(real + append_dims(s_r, real.ndim) * torch.randn_like(real), s_r, real_cond)
            gan_d = gan_critic_loss(logit_f, logit_r)
            loss = loss + self.gan_critic_weight * gan_d
            out.update(gan_d=gan_d.detach(), d_real=torch.sigmoid(logit_r).mean().detach(),
                       d_fake=torch.sigmoid(logit_f).mean().detach())
        out["loss"] = loss
        return out

    def _regression(self, student: nn.Module, teacher: nn.Module, batch: Batch) -> dict[str, Tensor]:
        """Warm start: ``mean ||G(sigma_max z) - ODE(z)||^2`` on a batch of cached teacher pairs (DMD eq. 9, with
        an L2 distance instead of LPIPS so that it applies to any data)."""
        n, _, device, dtype = self._batch_setup(student, teacher, batch)
        i = torch.randint(self.ode_z.shape[0], (n,), device=self.ode_z.device)
        s = float(teacher.sigma_max)
        cond = None if self.ode_cond is None else self.ode_cond[i]
        x = student(s * self.ode_z[i], torch.full((n,), s, device=device, dtype=dtype),
                    torch.zeros(n, device=device, dtype=dtype), cond)
        reg = F.mse_loss(x, self.ode_x0[i])
        xd = x.detach()
        return {"loss": reg, "regression": reg.detach(), "sample_mean": xd.mean(), "sample_std": xd.std()}

    def _student(self, student: nn.Module, teacher: nn.Module, batch: Batch) -> dict[str, Tensor]:
        n, cond, device, dtype = self._batch_setup(student, teacher, batch)
        x = self._generate(student, teacher, n, cond, device, dtype)
        # Distribution matching at a random noise level
        sigma = self._sample_sigma(self.dm_sigma, n, x)
        x_t = (x + append_dims(sigma, x.ndim) * torch.randn_like(x)).detach()
        with torch.no_grad():
            mu_real = teacher(x_t, sigma, cond, self.guidance).to(dtype)
            mu_fake = self.fake.denoise(x_t, sigma, cond).to(dtype)
        g = dmd_gradient(x.detach(), mu_real, mu_fake, self.dm_eps)
        dm = gradient_injection_loss(x, g)
        xd = x.detach()
        out = {
            "dm_loss": dm.detach(),
            "dm_grad_norm": g.reshape(n, -1).norm(dim=1).mean(),
            "sample_mean": xd.mean(),
            "sample_std": xd.std(),
        }
        loss = dm
        if self.gan_weight > 0:
            # Non-saturating GAN term on a re-noised sample, back-propagated through the frozen fake encoder
            s_g = self._sample_sigma(self.dm_sigma, n, x)
            with _no_param_grad(self.fake), _no_param_grad(self.gan_head):
                logits = self._logits(x + append_dims(s_g, x.ndim) * torch.randn_like(x), s_g, cond)
            gan_g = gan_generator_loss(logits).mean()
            loss = loss + self.gan_weight * gan_g
            out["gan_g"] = gan_g.detach()
        if self.regression_weight > 0:
            reg = self._regression(student, teacher, batch)["loss"]
            loss = loss + self.regression_weight * reg
            out["regression"] = reg.detach()
        out["loss"] = loss
        return out
