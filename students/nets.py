"""Raw student networks: the :class:`Backbone` call convention and the fresh MLP for low-dimensional data.

A backbone is the *raw* ``F`` of EDM-style preconditioning (Karras et al. 2022, arXiv:2206.00364, eq. 7):
``F(x_in, c_noise, c_noise_to=None, cond=None) -> [B, ...]`` with ``x_in = c_in x`` (same shape as ``x``) and the
parameterisation's ``c_noise`` (``[B]``), never raw sigma; :mod:`students.precond` applies ``c_skip``/``c_out``. A
flow-map student passes a second noise input for the target level, a conditional one its labels (for the MLP, label
``num_classes`` means "no class"). :mod:`students.backbones` adds the diffusers UNet backbone.

**Guidance-conditioned backbones** (LCM, Luo et al. 2023, arXiv:2310.04378 §4.2; sCD, Lu & Song 2024,
arXiv:2410.11081): a backbone built with a ``guidance`` spec takes the classifier-free-guidance scale ``w`` as an
input, read from ``cond.guidance`` (:func:`distill.core.cond.cond_guidance`), so one 1-NFE student samples the guided
teacher at any ``w`` without CFG's second pass. The scale enters through :class:`GuidanceEmbedding` (sinusoidal
features of ``w``: concatenated to the MLP's input, or a zero-initialised MLP added to the UNet's time embedding).
A backbone without that input rejects a ``cond`` that carries a scale.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from distill.core.cond import cond_guidance, cond_labels
from distill.core.registry import ConfigError

__all__ = ["sinusoidal_embedding", "Backbone", "RawFn", "MLPDenoiser", "GuidanceEmbedding", "GUIDANCE_KEYS"]

#: ``F(x_in, c_noise, c_noise_to=None) -> Tensor`` with the conditioning closed over (the ``torch.func.jvp`` entry)
RawFn = Callable[..., Tensor]


def sinusoidal_embedding(c: Tensor, dim: int, max_freq: float = 4.0) -> Tensor:
    """Sin/cos features of a per-sample scalar at ``dim // 2`` frequencies geometric in ``[1, max_freq]``.

    Transformer positional encodings (Vaswani et al. 2017, arXiv:1706.03762, §3.5) applied to ``c_noise``, whose
    useful range is only a few units (``log(sigma)/4`` spans [-1.6, 1.1] for sigma in [0.002, 80]); hence
    frequencies from 1 up to a small ``max_freq``. Keep it small: a discrete-time loss (CD on an 18-level grid)
    trains the net only at grid levels, and high frequencies make it arbitrary in between (on the ring, max_freq 100
    gave a consistency function worse at sigma = 1 than at sigma = 2; 2-8 made it smooth and monotone in sigma).

    Args:
        c: ``[B]`` scalar per sample.
        dim: even embedding width.
        max_freq: highest angular frequency.
    Returns:
        ``[B, dim]``.
    """
    if dim % 2:
        raise ValueError(f"embedding width must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(max_freq), half, device=c.device, dtype=c.dtype))
    args = c[:, None] * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


#: keys of a backbone's ``guidance`` spec and their defaults (:class:`GuidanceEmbedding`)
GUIDANCE_KEYS: dict[str, float | int] = {"emb_dim": 32, "max_freq": 4.0, "hidden": 128, "default": 1.0}


class GuidanceEmbedding(nn.Module):
    """The guidance-scale input of a guidance-conditioned backbone: ``w: [B] -> [B, out_dim]``.

    ``w`` is embedded by :func:`sinusoidal_embedding` (``emb_dim`` features, frequencies in ``[1, max_freq]``); with
    ``out_dim`` set, a ``Linear(emb_dim, hidden) -> SiLU -> Linear(hidden, out_dim)`` follows whose last layer is
    zero-initialised, so at init the embedding is exactly 0 for every ``w`` (a teacher copy that adds it to its time
    embedding is the teacher's network; the zero layer still gets gradients, since its inputs are not zero). Without
    ``out_dim`` the raw features are returned (no parameters; the fresh MLP concatenates them).

    Args:
        out_dim: width of the learnt projection (``None``: raw sinusoidal features, ``[B, emb_dim]``).
        emb_dim: even width of the sinusoidal features.
        max_freq: highest frequency of the features.
        hidden: width of the projection's hidden layer.
        default: the scale used when ``cond`` carries none (e.g. labels from a teacher-pair cache); 1 = unguided.
    """

    def __init__(self, out_dim: int | None = None, emb_dim: int = 32, max_freq: float = 4.0, hidden: int = 128,
                 default: float = 1.0) -> None:
        super().__init__()
        if emb_dim < 2 or emb_dim % 2 or hidden < 1:
            raise ValueError(f"guidance embedding needs an even emb_dim >= 2 and hidden >= 1, got {emb_dim}, {hidden}")
        self.emb_dim, self.max_freq, self.default = int(emb_dim), float(max_freq), float(default)
        self.out_dim = emb_dim if out_dim is None else int(out_dim)
        self.proj = None
        if out_dim is not None:
            self.proj = nn.Sequential(nn.Linear(emb_dim, hidden), nn.SiLU(), nn.Linear(hidden, out_dim))
            nn.init.zeros_(self.proj[-1].weight)
            nn.init.zeros_(self.proj[-1].bias)

    @staticmethod
    def spec(options: dict | bool | None) -> dict | None:
        """The JSON spec of a backbone's ``guidance`` option: ``True`` -> the defaults, a dict -> checked and filled
        (:data:`GUIDANCE_KEYS`), ``None``/``False`` -> ``None`` (no guidance input)."""
        if options is None or options is False:
            return None
        if not isinstance(options, (bool, dict)):
            raise ConfigError(f"guidance input must be true/false or a dict of {', '.join(GUIDANCE_KEYS)}, got "
                              f"{options!r}")
        opts = {} if options is True else dict(options)
        unknown = sorted(set(opts) - set(GUIDANCE_KEYS))
        if unknown:
            raise ConfigError(f"unknown guidance-input key(s) {unknown}; valid keys: {', '.join(GUIDANCE_KEYS)}")
        return {**GUIDANCE_KEYS, **opts}

    def scale(self, cond: object, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The per-sample scale ``[n]`` carried by ``cond`` (``cond.guidance``), or ``default`` where it has none."""
        w = cond_guidance(cond)
        if w is None:
            return torch.full((n,), self.default, device=device, dtype=dtype)
        if w.shape != (n,):
            raise ValueError(f"cond.guidance must be [B] = [{n}], got {list(w.shape)}")
        return w.to(device=device, dtype=dtype)

    def forward(self, cond: object, n: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """``[n, out_dim]`` embedding of the scale in ``cond`` (see :meth:`scale`)."""
        feats = sinusoidal_embedding(self.scale(cond, n, device, dtype), self.emb_dim, self.max_freq)
        return feats if self.proj is None else self.proj(feats)


class Backbone(nn.Module):
    """Base of raw backbones: ``forward(x_in, c_noise, c_noise_to=None, cond=None) -> Tensor`` shaped like ``x_in``.

    ``two_levels`` says whether the network takes the flow map's target level ``c_noise_to``.
    """

    two_levels: bool = False

    def forward(
        self, x_in: Tensor, c_noise: Tensor, c_noise_to: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor:
        raise NotImplementedError

    def raw_fn(self, cond: Tensor | None = None) -> RawFn:
        """The network as a plain function ``fn(x_in, c_noise, c_noise_to=None) -> Tensor`` of tensors only, with
        ``cond`` closed over: the entry point for ``torch.func.jvp`` (tangents in ``x_in``, ``c_noise`` and, for flow
        maps, ``c_noise_to``), e.g. for the time derivative ``df/dt`` of continuous-time consistency training (sCM,
        arXiv:2410.11081 §4)."""

        def fn(x_in: Tensor, c_noise: Tensor, c_noise_to: Tensor | None = None) -> Tensor:
            return self(x_in, c_noise, c_noise_to, cond)

        return fn


class MLPDenoiser(Backbone):
    """``F(x_in, c_noise[, c_noise_to][, label]) -> [B, D]``: a SiLU MLP on ``[B, D]`` data (inputs ``[B, ...]`` are
    flattened and the output takes the input's shape).

    Args:
        dim: data dimension ``D`` (inputs are flattened ``[B, D]``).
        hidden: width of the hidden layers.
        depth: number of hidden layers (>= 1).
        emb_dim: width of each sinusoidal noise embedding.
        two_levels: take a second noise embedding (the flow map's target level).
        num_classes: add a label embedding with ``num_classes + 1`` rows (the last one means "unconditional").
        max_freq: highest frequency of the noise embeddings.
        guidance: a guidance-scale input (``True`` or a dict of :data:`GUIDANCE_KEYS`): sinusoidal features of
            ``cond.guidance`` concatenated to the input (:class:`GuidanceEmbedding`).
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 4,
        emb_dim: int = 64,
        two_levels: bool = False,
        num_classes: int | None = None,
        max_freq: float = 4.0,
        guidance: dict | bool | None = None,
    ) -> None:
        super().__init__()
        if depth < 1 or hidden < 1 or emb_dim < 2:
            raise ValueError(f"MLPDenoiser needs depth >= 1, hidden >= 1, emb_dim >= 2; got {depth}, {hidden}, "
                             f"{emb_dim}")
        self.dim, self.emb_dim, self.two_levels, self.num_classes = dim, emb_dim, two_levels, num_classes
        self.max_freq = float(max_freq)
        n_emb = 2 if two_levels else 1
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        g = GuidanceEmbedding.spec(guidance)
        self.guidance_emb = None if g is None else GuidanceEmbedding(
            None, **{k: v for k, v in g.items() if k != "hidden"})
        width_in = dim + emb_dim * (n_emb + (1 if num_classes else 0))
        width_in += self.guidance_emb.out_dim if self.guidance_emb is not None else 0
        layers: list[nn.Module] = [nn.Linear(width_in, hidden)]
        for _ in range(depth - 1):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        layers += [nn.SiLU(), nn.Linear(hidden, dim)]
        self.mlp = nn.Sequential(*layers)

    def forward(
        self, x_in: Tensor, c_noise: Tensor, c_noise_to: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor:
        """Args: ``x_in: [B, D]`` or ``[B, ...]`` with ``D`` elements per sample (already scaled by ``c_in``),
        ``c_noise: [B]``, ``c_noise_to: [B]`` (flow maps), ``cond``: ``[B]`` integer labels, a
        :class:`~distill.core.cond.Cond` (labels, and ``guidance: [B]`` for a guidance-conditioned MLP) or ``None``.
        Returns a tensor shaped like ``x_in``."""
        shape = x_in.shape
        x_in = x_in.reshape(shape[0], -1)
        feats = [x_in, sinusoidal_embedding(c_noise, self.emb_dim, self.max_freq)]
        if self.two_levels:
            if c_noise_to is None:
                raise ValueError("this MLPDenoiser was built with two_levels=True: pass c_noise_to")
            feats.append(sinusoidal_embedding(c_noise_to, self.emb_dim, self.max_freq))
        if self.guidance_emb is not None:
            feats.append(self.guidance_emb(cond, shape[0], x_in.device, x_in.dtype))
        elif cond_guidance(cond) is not None:
            raise ValueError("this student has no guidance input but cond carries a guidance scale")
        cond = cond_labels(cond)
        if self.label_emb is not None:
            if cond is None:
                cond = torch.full((x_in.shape[0],), self.num_classes, device=x_in.device, dtype=torch.long)
            feats.append(self.label_emb(cond.long()))
        return self.mlp(torch.cat([f.to(x_in.dtype) for f in feats], dim=1)).reshape(shape)
