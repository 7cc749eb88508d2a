"""LoRA adapters (peft) on a student's backbone or a fake score's copied network: the frozen base plus trainable
low-rank updates ``W + (alpha / r) B A`` (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models",
arXiv:2106.09685; LCM-LoRA, arXiv:2311.05556, distils a latent consistency model this way).

The spec is a JSON dict (:data:`LORA_KEYS`): ``{"rank": 8, "alpha": 8, "target_modules": [...], "dropout": 0.0}``.
peft's LoRA initialises ``B = 0``, so at injection the adapted network computes exactly what the base computes.
Injection goes through diffusers' own ``add_adapter`` for models that have it (``PeftAdapterMixin``:
``UNet2DConditionModel``, the transformers), which is what diffusers' ``load_lora_weights`` / ``load_lora_adapter``
read back, and through peft's ``inject_adapter_in_model`` otherwise (``UNet2DModel``, the MLP); the parameter names
(``<module>.lora_A.default.weight``, ``<module>.base_layer.weight``) are the same either way.

Only adapter parameters keep ``requires_grad``; :func:`lora_param_names` splits a network's parameters into adapter
and base names, so the students and the training system can keep the frozen base out of optimizers, EMAs and
checkpoints (docs/design.md §5, §6).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.core.registry import ConfigError

__all__ = [
    "LORA_KEYS", "DEFAULT_UNET_TARGETS", "check_lora_spec", "lora_config", "add_lora", "is_adapter_name",
    "lora_param_names", "adapter_state_dict", "merged_copy", "merged_state_dict", "save_adapter", "load_adapter",
    "ADAPTER_WEIGHTS", "ADAPTER_CONFIG",
]

#: the keys of a ``lora`` spec and their defaults (``alpha`` null = ``rank``; ``target_modules`` null = the
#: backbone's default: :data:`DEFAULT_UNET_TARGETS` for diffusers UNets, every ``nn.Linear`` for the MLP)
LORA_KEYS: dict[str, Any] = {"rank": 8, "alpha": None, "target_modules": None, "dropout": 0.0}
#: attention projections, ResNet convolutions and the time-embedding projections of diffusers UNet blocks (the
#: module names diffusers' LCM-LoRA example trains, less the text-only ones a pixel UNet lacks)
DEFAULT_UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj")
#: file names of a peft adapter folder (``PeftModel.from_pretrained`` / :func:`load_adapter` read them)
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
_ADAPTER = "default"  # the adapter name peft and diffusers use when none is given
PEFT_PREFIX = "base_model.model."  # where a PeftModel keeps the wrapped network (its saved adapter names start so)


def check_lora_spec(spec: Any, owner: str = "student") -> dict[str, Any]:
    """Validate and complete a ``lora`` spec; one-line :class:`ConfigError` on unknown keys or bad values.

    Returns ``{"rank": int, "alpha": float, "target_modules": list[str] | None, "dropout": float}``.
    """
    if not isinstance(spec, dict):
        raise ConfigError(f"{owner} lora must be a mapping with keys {', '.join(LORA_KEYS)}, got {spec!r}")
    unknown = sorted(set(spec) - set(LORA_KEYS))
    if unknown:
        raise ConfigError(f"unknown {owner} lora key(s) {unknown}; valid keys: {', '.join(LORA_KEYS)}")
    out = {**LORA_KEYS, **spec}
    rank = out["rank"]
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"{owner} lora rank must be an integer >= 1, got {rank!r}")
    alpha = float(rank if out["alpha"] is None else out["alpha"])
    if alpha <= 0:
        raise ConfigError(f"{owner} lora alpha must be > 0, got {out['alpha']!r}")
    dropout = float(out["dropout"])
    if not 0.0 <= dropout < 1.0:
        raise ConfigError(f"{owner} lora dropout must lie in [0, 1), got {out['dropout']!r}")
    targets = out["target_modules"]
    if targets is not None:
        if isinstance(targets, str):
            targets = [targets]
        if not targets or not all(isinstance(t, str) and t for t in targets):
            raise ConfigError(f"{owner} lora target_modules must be a non-empty list of module names, got "
                              f"{out['target_modules']!r}")
        targets = list(targets)
    return {"rank": int(rank), "alpha": alpha, "target_modules": targets, "dropout": dropout}


def _default_targets(net: nn.Module) -> list[str]:
    if hasattr(net, "config") and hasattr(net, "down_blocks"):  # a diffusers UNet
        return list(DEFAULT_UNET_TARGETS)
    names = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)]
    if not names:
        raise ConfigError(f"lora: {type(net).__name__} has no nn.Linear layer; name target_modules")
    return names


def lora_config(spec: dict[str, Any], net: nn.Module) -> Any:
    """The ``peft.LoraConfig`` of a checked spec for ``net`` (default targets filled in)."""
    from peft import LoraConfig  # peft is imported here only: students without LoRA never need it

    spec = check_lora_spec(spec)
    return LoraConfig(r=spec["rank"], lora_alpha=spec["alpha"], lora_dropout=spec["dropout"],
                      target_modules=spec["target_modules"] or _default_targets(net), init_lora_weights=True)


def add_lora(net: nn.Module, spec: dict[str, Any]) -> nn.Module:
    """Inject LoRA adapters into ``net`` in place and freeze every non-adapter parameter; returns ``net``.

    Diffusers models with ``add_adapter`` (``PeftAdapterMixin``) get diffusers' integration, others peft's
    ``inject_adapter_in_model``. A target that matches no module fails with one line naming the module names.
    """
    from peft import inject_adapter_in_model

    cfg = lora_config(spec, net)
    try:
        if hasattr(net, "add_adapter") and hasattr(net, "load_lora_adapter"):
            net.add_adapter(cfg)
        else:
            inject_adapter_in_model(cfg, net, adapter_name=_ADAPTER)
    except ValueError as exc:
        if "not found in the base model" in str(exc) or "Target modules" in str(exc):
            leaves = sorted({n.rsplit(".", 1)[-1] for n, m in net.named_modules()
                             if isinstance(m, (nn.Linear, nn.Conv2d))})
            raise ConfigError(f"lora target_modules {sorted(cfg.target_modules)} match no layer of "
                              f"{type(net).__name__}; its linear/conv layer names end in: {', '.join(leaves)}") \
                from None
        raise
    for name, p in net.named_parameters():
        p.requires_grad_(is_adapter_name(name))
    return net


def is_adapter_name(name: str) -> bool:
    """Whether a parameter/state name belongs to a LoRA adapter (peft's ``lora_A``/``lora_B``/... tensors)."""
    return ".lora_" in name or name.startswith("lora_")


def lora_param_names(net: nn.Module) -> tuple[list[str], list[str]]:
    """``(adapter, base)`` parameter names of a LoRA-injected network."""
    adapter, base = [], []
    for name, _ in net.named_parameters():
        (adapter if is_adapter_name(name) else base).append(name)
    return adapter, base


def base_name(name: str) -> str:
    """The plain (un-injected) name of a base parameter: ``a.to_q.base_layer.weight`` -> ``a.to_q.weight``."""
    return name.replace(".base_layer.", ".")


def adapter_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors in peft's saved form (``get_peft_model_state_dict``: ``<module>.lora_A.weight``)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(net, adapter_name=_ADAPTER).items()}


def merged_copy(net: nn.Module) -> nn.Module:
    """A copy of a LoRA-injected ``net`` with the adapters merged into the base weights and the peft wrappers
    removed (``BaseTunerLayer.merge`` then ``get_base_layer``): a plain network of the original class."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = copy.deepcopy(net)
    for name, module in list(out.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[_ADAPTER])
            parent_name, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent_name) if parent_name else out, child, module.get_base_layer())
    if hasattr(out, "peft_config"):
        del out.peft_config
    if hasattr(out, "_hf_peft_config_loaded"):
        out._hf_peft_config_loaded = False
    return out


def merged_state_dict(net: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of :func:`merged_copy` (plain names, adapters folded in)."""
    return {k: v.detach().contiguous() for k, v in merged_copy(net).state_dict().items()}


def save_adapter(net: nn.Module, folder: str | Path) -> Path:
    """Write ``net``'s adapter as a peft adapter folder: ``adapter_model.safetensors`` (peft's saved names) and
    ``adapter_config.json`` (the ``LoraConfig``). ``peft.PeftModel.from_pretrained(base_net, folder)`` and
    :func:`load_adapter` read it back; for diffusers models with ``load_lora_adapter`` it also loads with
    ``net.load_lora_adapter(folder, prefix=None)``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # PeftModel's on-disk names: the network sits at ``base_model.model`` inside a ``PeftModel``
    save_file({PEFT_PREFIX + k: v for k, v in adapter_state_dict(net).items()}, folder / ADAPTER_WEIGHTS)
    net.peft_config[_ADAPTER].save_pretrained(str(folder))
    return folder


def load_adapter(net: nn.Module, folder: str | Path) -> nn.Module:
    """Inject the adapter of a peft adapter folder (:func:`save_adapter`) into a plain ``net`` and load its weights
    (``peft.inject_adapter_in_model`` + ``set_peft_model_state_dict``); returns ``net`` (in place)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"adapter folder {str(folder)!r} has no {name}")
    cfg = LoraConfig(**{k: v for k, v in json.loads((folder / ADAPTER_CONFIG).read_text()).items()
                        if k in LoraConfig.__dataclass_fields__})
    inject_adapter_in_model(cfg, net, adapter_name=_ADAPTER)
    state = {k.removeprefix(PEFT_PREFIX): v for k, v in load_file(folder / ADAPTER_WEIGHTS).items()}
    result = set_peft_model_state_dict(net, state, adapter_name=_ADAPTER)
    missing = [k for k in getattr(result, "missing_keys", []) if is_adapter_name(k)]
    if missing:
        raise ValueError(f"adapter folder {str(folder)!r} lacks {len(missing)} adapter tensor(s) (e.g. {missing[0]})")
    return net
