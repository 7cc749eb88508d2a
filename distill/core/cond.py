"""Conditioning of one batch: what every teacher, student, sampler and loss passes along as ``cond``.

``cond`` is one of

* ``None`` - unconditional;
* a ``[B]`` integer tensor - class labels (the original form; still accepted everywhere);
* a :class:`Cond` - structured conditioning: class labels and/or text embeddings (prompt embeddings, pooled
  embeddings, attention mask, further per-sample inputs such as SDXL's ``time_ids``) and an optional per-sample
  classifier-free-guidance scale.

Losses and samplers never look inside ``cond``: they pass it through, and slice, move or concatenate it only with the
helpers below (:func:`cond_index`, :func:`cond_to`, :func:`cond_cat`, :func:`cond_size`). Teachers and student
backbones are the only places that read its fields.

**Guidance in the condition.** ``Cond.guidance`` (``[B]``) says "this sample is wanted at CFG scale w". A teacher
applies it (``D_w = D_u + w (D_c - D_u)``, :meth:`teachers.base.Teacher.forward`); a guidance-conditioned student
takes it as an input (LCM / sCD-style guidance distillation: one network that samples at any w without CFG's second
pass); a student without a guidance input rejects it. Because the scale travels with the batch, every loss distils a
guided teacher without a guidance option of its own.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "Cond",
    "CondLike",
    "as_cond",
    "cond_cat",
    "cond_guidance",
    "cond_index",
    "cond_labels",
    "cond_size",
    "cond_to",
    "split_guidance",
]


@dataclass(frozen=True)
class Cond:
    """Structured per-sample conditioning (every tensor has the batch as its leading dimension).

    Attributes:
        labels: ``[B]`` integer class labels.
        embeds: ``[B, L, D]`` encoder hidden states (text embeddings).
        pooled: ``[B, P]`` pooled text embeddings (SDXL ``text_embeds``, SD3 ``pooled_projections``).
        mask: ``[B, L]`` attention mask of ``embeds`` (1 = keep).
        added: further named per-sample inputs the network takes (e.g. SDXL ``time_ids``: ``[B, 6]``).
        guidance: ``[B]`` classifier-free-guidance scale (applied by teachers, an input of guidance-conditioned
            students).
    """

    labels: Tensor | None = None
    embeds: Tensor | None = None
    pooled: Tensor | None = None
    mask: Tensor | None = None
    added: Mapping[str, Tensor] = field(default_factory=dict)
    guidance: Tensor | None = None

    def __post_init__(self) -> None:
        sizes = {name: t.shape[0] for name, t in self._tensors()}
        if not sizes:
            raise ValueError("Cond needs at least one field (labels, embeds, pooled, mask, added or guidance)")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"Cond fields disagree on the batch size: {sizes}")

    def _tensors(self) -> list[tuple[str, Tensor]]:
        out = [(f.name, getattr(self, f.name)) for f in fields(self) if f.name != "added"]
        out = [(k, v) for k, v in out if v is not None]
        return out + [(f"added.{k}", v) for k, v in self.added.items()]

    def __len__(self) -> int:
        return int(self._tensors()[0][1].shape[0])

    def map(self, fn: Any) -> Cond:
        """A copy with ``fn`` applied to every tensor."""
        kw = {f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name)))
              for f in fields(self) if f.name != "added"}
        return Cond(**kw, added={k: fn(v) for k, v in self.added.items()})

    def replace(self, **changes: Any) -> Cond:
        return replace(self, **changes)


CondLike = Tensor | Cond | None


def as_cond(cond: CondLike) -> Cond | None:
    """``cond`` as a :class:`Cond` (labels tensors become ``Cond(labels=...)``; ``None`` stays ``None``)."""
    if cond is None or isinstance(cond, Cond):
        return cond
    if isinstance(cond, Tensor):
        return Cond(labels=cond)
    raise TypeError(f"cond must be None, a [B] label tensor or a Cond, got {type(cond).__name__}")


def cond_size(cond: CondLike) -> int | None:
    """The batch size of ``cond`` (``None`` for ``None``)."""
    return None if cond is None else len(cond)


def cond_index(cond: CondLike, idx: Any) -> CondLike:
    """Rows ``idx`` (a slice, index tensor or mask) of ``cond``."""
    if cond is None:
        return None
    return cond[idx] if isinstance(cond, Tensor) else cond.map(lambda t: t[idx])


def cond_to(cond: CondLike, device: torch.device | str | None = None) -> CondLike:
    """``cond`` on ``device``."""
    if cond is None:
        return None
    return cond.to(device) if isinstance(cond, Tensor) else cond.map(lambda t: t.to(device))


def cond_cat(conds: Sequence[CondLike]) -> CondLike:
    """Concatenate along the batch (all ``None``, all tensors, or all :class:`Cond` with the same fields)."""
    if all(c is None for c in conds):
        return None
    if all(isinstance(c, Tensor) for c in conds):
        return torch.cat(list(conds))
    if not all(isinstance(c, Cond) for c in conds):
        raise TypeError("cond_cat: cannot mix None, label tensors and Cond")
    first = conds[0]
    names = [k for k, _ in first._tensors()]
    for c in conds[1:]:
        if [k for k, _ in c._tensors()] != names:
            raise ValueError(f"cond_cat: Cond fields differ: {names} vs {[k for k, _ in c._tensors()]}")
    kw = {f.name: (None if getattr(first, f.name) is None else torch.cat([getattr(c, f.name) for c in conds]))
          for f in fields(first) if f.name != "added"}
    return Cond(**kw, added={k: torch.cat([c.added[k] for c in conds]) for k in first.added})


def cond_labels(cond: CondLike) -> Tensor | None:
    """The class labels in ``cond`` (``None`` if it has none)."""
    if cond is None or isinstance(cond, Tensor):
        return cond
    return cond.labels


def cond_guidance(cond: CondLike) -> Tensor | None:
    """The per-sample guidance scale in ``cond`` (``None`` if it has none)."""
    return cond.guidance if isinstance(cond, Cond) else None


def split_guidance(cond: CondLike, guidance: float | Tensor = 1.0) -> tuple[CondLike, float | Tensor]:
    """``(cond without its guidance, the guidance to apply)``: the scale carried by ``cond`` if any, else
    ``guidance``. Giving both (``cond.guidance`` and a ``guidance`` other than 1) is an error: one of them would be
    silently ignored."""
    w = cond_guidance(cond)
    if w is None:
        return cond, guidance
    if not (isinstance(guidance, (int, float)) and float(guidance) == 1.0):
        raise ValueError("guidance given twice: the batch's cond carries a guidance scale and the call passes "
                         f"guidance={guidance!r}; drop one (e.g. the loss's guidance option)")
    if [k for k, _ in cond._tensors()] == ["guidance"]:  # a scale and nothing else: unconditional (no CFG possible)
        return None, w
    return cond.replace(guidance=None), w
