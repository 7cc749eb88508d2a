"""Raw student networks: the :class:`Backbone` call convention and the fresh MLP for low-dimensional data.

A backbone is the *raw* ``F`` of EDM-style preconditioning (Karras et al. 2022, arXiv:2206.00364, eq. 7):
``F(x_in, c_noise, c_noise_to=None, cond=None) -> [B, ...]`` with ``x_in = c_in x`` (same shape as ``x``) and the
parameterisation's ``c_noise`` (``[B]``), never raw sigma; :mod:`students.precond` applies ``c_skip``/``c_out``. A
flow-map student passes a second noise input for the target level, a conditional one its labels (for the MLP, label
``num_classes`` means "no class"). :mod:`students.backbones` adds the diffusers UNet backbone.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from distill.core.cond import cond_guidance, cond_labels

__all__ = ["sinusoidal_embedding", "Backbone", "RawFn", "MLPDenoiser"]

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
    ) -> None:
        super().__init__()
        if depth < 1 or hidden < 1 or emb_dim < 2:
            raise ValueError(f"MLPDenoiser needs depth >= 1, hidden >= 1, emb_dim >= 2; got {depth}, {hidden}, "
                             f"{emb_dim}")
        self.dim, self.emb_dim, self.two_levels, self.num_classes = dim, emb_dim, two_levels, num_classes
        self.max_freq = float(max_freq)
        n_emb = 2 if two_levels else 1
        self.label_emb = nn.Embedding(num_classes + 1, emb_dim) if num_classes else None
        width_in = dim + emb_dim * (n_emb + (1 if num_classes else 0))
        layers: list[nn.Module] = [nn.Linear(width_in, hidden)]
        for _ in range(depth - 1):
            layers += [nn.SiLU(), nn.Linear(hidden, hidden)]
        layers += [nn.SiLU(), nn.Linear(hidden, dim)]
        self.mlp = nn.Sequential(*layers)

    def forward(
        self, x_in: Tensor, c_noise: Tensor, c_noise_to: Tensor | None = None, cond: Tensor | None = None
    ) -> Tensor:
        """Args: ``x_in: [B, D]`` or ``[B, ...]`` with ``D`` elements per sample (already scaled by ``c_in``),
        ``c_noise: [B]``, ``c_noise_to: [B]`` (flow maps), ``cond: [B]`` integer labels or ``None``. Returns a tensor
        shaped like ``x_in``."""
        shape = x_in.shape
        x_in = x_in.reshape(shape[0], -1)
        feats = [x_in, sinusoidal_embedding(c_noise, self.emb_dim, self.max_freq)]
        if self.two_levels:
            if c_noise_to is None:
                raise ValueError("this MLPDenoiser was built with two_levels=True: pass c_noise_to")
            feats.append(sinusoidal_embedding(c_noise_to, self.emb_dim, self.max_freq))
        if cond_guidance(cond) is not None:
            raise ValueError("this student has no guidance input but cond carries a guidance scale")
        cond = cond_labels(cond)
        if self.label_emb is not None:
            if cond is None:
                cond = torch.full((x_in.shape[0],), self.num_classes, device=x_in.device, dtype=torch.long)
            feats.append(self.label_emb(cond.long()))
        return self.mlp(torch.cat([f.to(x_in.dtype) for f in feats], dim=1)).reshape(shape)
