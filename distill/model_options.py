"""The ``model`` section of a run config: attention backend, gradient checkpointing, teacher CPU offload.

These are the ecosystem's memory knobs, used, not rewritten: diffusers' ``enable_xformers_memory_efficient_attention``
and ``enable_gradient_checkpointing`` on every diffusers network of the run, and accelerate's ``cpu_offload`` for the
frozen teacher. Each combination that cannot work fails before training with one line:

* ``attention: xformers`` needs the xformers package (the ``xformers`` extra) and a CUDA device (xformers has no CPU
  kernels), and cannot run a forward-mode JVP (sCM, MeanFlow, AYF with ``loss.jvp: autograd``; use
  ``loss.jvp: finite_difference`` or ``sdpa``, whose math kernel those losses select for the JVP);
* ``gradient_checkpointing`` cannot run under a forward-mode JVP either (PyTorch's checkpointing has no forward AD),
  and needs a student network that supports it (diffusers models do; the MLP does not);
* ``teacher_offload: cpu`` needs a CUDA device (on a CPU run the weights already live in host memory). It is applied
  after the module is placed on its device and the loss has copied what it needs from the teacher (fake scores are
  copies of the teacher's network), so nothing copies an offloaded (meta) network. The memory estimate
  (``distill train --dry-run``) reports an offloaded teacher's weights as host memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from distill.core.registry import ConfigError

__all__ = ["ATTENTION", "TEACHER_OFFLOAD", "check_model_options", "apply_model_options", "offload_teacher",
           "diffusers_networks"]

ATTENTION = ("sdpa", "xformers")
TEACHER_OFFLOAD = ("none", "cpu")


def diffusers_networks(root: nn.Module) -> list[nn.Module]:
    """The outermost diffusers models (``ModelMixin``) inside ``root`` (``root`` itself if it is one)."""
    from diffusers import ModelMixin

    out: list[nn.Module] = []

    def visit(m: nn.Module) -> None:
        if isinstance(m, ModelMixin):
            out.append(m)
            return
        for child in m.children():
            visit(child)

    visit(root)
    return out


def check_model_options(opts: Any, loss: Any, accelerator: str) -> None:
    """Refuse (one line) a ``model`` section that cannot work with this loss and accelerator."""
    attention, offload = str(opts.attention), str(opts.teacher_offload)
    if attention not in ATTENTION:
        raise ConfigError(f"unknown model.attention {attention!r}; valid: {', '.join(ATTENTION)}")
    if offload not in TEACHER_OFFLOAD:
        raise ConfigError(f"unknown model.teacher_offload {offload!r}; valid: {', '.join(TEACHER_OFFLOAD)}")
    gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    forward_ad = bool(getattr(loss, "uses_forward_ad", False))
    if attention == "xformers":
        if forward_ad:
            raise ConfigError("model.attention: xformers has no forward-mode AD, which this loss's JVP needs; use "
                              "model.attention: sdpa or loss.jvp: finite_difference")
        try:
            import xformers  # noqa: F401
        except ImportError:
            raise ConfigError("model.attention: xformers needs the xformers package (pip install -e '.[xformers]'); "
                              "valid without it: sdpa") from None
        if not gpu or not torch.cuda.is_available():
            raise ConfigError("model.attention: xformers has no CPU kernels; it needs trainer.accelerator: gpu and a "
                              "CUDA device (valid on CPU: sdpa)")
    if opts.gradient_checkpointing and forward_ad:
        raise ConfigError("model.gradient_checkpointing cannot run under this loss's forward-mode JVP; set it to "
                          "false or use loss.jvp: finite_difference")
    if offload == "cpu" and (not gpu or not torch.cuda.is_available()):
        raise ConfigError("model.teacher_offload: cpu streams the teacher's weights to a GPU; it needs "
                          "trainer.accelerator: gpu and a CUDA device (on CPU the weights are in host memory already)")


def apply_model_options(opts: Any, teacher: nn.Module, student: nn.Module) -> None:
    """Attention backend and gradient checkpointing on the run's diffusers networks (before any copy is made, so
    the loss's copies of the teacher inherit the attention processors)."""
    if str(opts.attention) == "xformers":
        for net in diffusers_networks(teacher) + diffusers_networks(student):
            net.enable_xformers_memory_efficient_attention()
    if opts.gradient_checkpointing:
        nets = [n for n in diffusers_networks(student) if getattr(n, "_supports_gradient_checkpointing", False)]
        if not nets:
            raise ConfigError("model.gradient_checkpointing: the student's network does not support it (diffusers "
                              "models do; the MLP does not)")
        for net in nets:
            net.enable_gradient_checkpointing()


def offload_teacher(teacher: nn.Module, device: torch.device | str) -> list[nn.Module]:
    """accelerate's ``cpu_offload`` on every diffusers network of the frozen ``teacher``: weights stay in host
    memory, each submodule's are moved to ``device`` for its forward. Returns the offloaded networks."""
    from accelerate import cpu_offload

    nets = diffusers_networks(teacher)
    for net in nets:
        cpu_offload(net, execution_device=torch.device(device))
    return nets
