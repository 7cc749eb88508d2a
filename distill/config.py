"""Run configuration: YAML files in ``configs/`` + ``key=value`` overrides, validated against typed dataclasses.

The top level and the fixed sections (``data``, ``trainer``, ``eval``, ``optim.*``) are OmegaConf structured
configs, so an unknown key fails at load time. The ``teacher``, ``student`` and ``loss`` sections are free mappings
whose keys are the constructor arguments of the named component (docs/design.md §2.2): they are checked against the
constructor signature when the component is built. Every error is one line that names the bad key and the valid ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from distill.core.registry import ConfigError

__all__ = [
    "DataConfig",
    "OptimConfig",
    "TrainerConfig",
    "EvalConfig",
    "SamplingConfig",
    "EMAConfig",
    "ModelConfig",
    "RunConfig",
    "load_config",
    "to_container",
    "save_config",
]


@dataclass
class DataConfig:
    """Real data for losses that need it (consistency distillation from data, GAN heads).

    ``name``: a dataset registered in :mod:`distill.core.data` (``digits``, ``mnist``), ``teacher`` (exact samples of an
    analytic teacher) or ``None`` (data-free).
    """

    name: str | None = None
    batch_size: int = 128  # per-iteration global batch (split across processes under DDP)
    conditional: bool = False  # pass the dataset's labels to the teacher/student as cond
    pair_cache_dir: str | None = None  # teacher-pair cache root (default: <out_dir>/teacher_pairs); share to reuse
    # guidance distillation: [w_min, w_max] -> every batch's cond carries a per-sample CFG scale w ~ U[w_min, w_max]
    # that the teacher applies and a guidance-conditioned student (student.guidance_input) takes as input
    guidance: list[float] | None = None


@dataclass
class OptimConfig:
    """One optimizer (one per loss phase). ``name``: adam, adamw or radam."""

    name: str = "adam"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup: int = 0  # linear learning-rate warm-up, in optimizer steps of this phase
    decay: str = "none"  # none | cosine | linear: after the warm-up, anneal the lr to final_lr_ratio * lr at the end
    final_lr_ratio: float = 0.0  # lr at the last step of training, as a fraction of lr (decay != none)
    grad_clip: float | None = 1.0  # max gradient norm; None disables clipping (the norm is still logged)


@dataclass
class TrainerConfig:
    """Lightning trainer settings. ``max_steps`` counts training *iterations* (one pass over the loss's phases)."""

    max_steps: int = 1000
    accelerator: str = "cpu"
    devices: int = 1
    strategy: str = "auto"
    precision: str = "32-true"  # "bf16-mixed" for bf16 autocast
    log_every: int = 50
    ckpt_every: int = 500
    grid_every: int = 500
    progress_bar: bool = True
    num_threads: int | None = None  # torch.set_num_threads on CPU
    nonfinite_rows: str = "skip"  # a loss reporting NaN/Inf sample rows: skip the phase's step, or drop the rows


@dataclass
class EvalConfig:
    """What ``distill eval`` and the in-training FID callback measure (the protocol is recorded with each number)."""

    nfe: list[int] = field(default_factory=lambda: [1, 2, 4])  # student NFEs during/after training
    every: int = 500  # in-training evaluation period (iterations); 0 disables
    n_samples: int = 2000
    seeds: list[int] = field(default_factory=lambda: [0])
    batch_size: int = 1000
    features: str = "auto"  # auto | digits | inception | flatten
    inception_path: str | None = None  # local inception-2015-12-05.pt or its folder; else $DISTILL_INCEPTION_WEIGHTS
    # reference statistics: a clean-fid .npz (mu, sigma), a distill ReferenceStats .npz or a folder of images;
    # null = the shipped digits statistics (digits features only). A number's proxy/final kind follows from its
    # sample count and the reference size (distill.fid.protocol_kind), never from the config.
    reference: str | None = None
    # teacher solvers for the FID-vs-NFE table of `distill eval`
    samplers: list[str] = field(default_factory=lambda: ["euler", "heun", "dpmpp_2m", "unipc"])
    grids: list[str] = field(default_factory=lambda: ["karras", "logsnr"])
    teacher_nfe: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    reference_nfe: int = 35
    reference_sampler: str = "heun"
    diffusers_samplers: list[str] = field(default_factory=list)  # e.g. [dpmpp_2m, unipc] through the bridge
    guidance: float = 1.0


@dataclass
class SamplingConfig:
    """Overrides of the student's sampling plan (``students.SamplingPlan``; null = the loss's or the default):
    ``levels`` per NFE (explicit lists win), else ``sigma_max`` then Karras levels down to ``floor``; CTM ``gamma``
    (0 = deterministic jumps, 1 = multistep consistency sampling). Used by evaluation, grids and export alike."""

    gamma: float | None = None
    floor: float | None = None
    levels: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class EMAConfig:
    """The student's evaluation EMA (``distill.core.ema``): ``exp`` with ``decay``, or EDM2's ``power`` EMA with
    ``gamma`` or ``sigma_rel``."""

    kind: str = "exp"
    decay: float = 0.999
    gamma: float | None = None
    sigma_rel: float | None = None


@dataclass
class ModelConfig:
    """How the networks run: the ecosystem's memory knobs, used through diffusers and accelerate
    (:mod:`distill.model_options`).

    ``attention``: ``sdpa`` (PyTorch's scaled-dot-product attention, diffusers' default) or ``xformers`` (diffusers'
    ``enable_xformers_memory_efficient_attention``: needs the xformers extra and a CUDA device; not with forward-mode
    JVP losses). ``gradient_checkpointing``: diffusers' ``enable_gradient_checkpointing`` on the student's network
    (not with forward-mode JVP losses). ``teacher_offload``: ``none`` or ``cpu`` (accelerate's ``cpu_offload``: the
    frozen teacher's weights stay in host memory and are streamed to the GPU layer by layer; needs a CUDA device).
    """

    attention: str = "sdpa"
    gradient_checkpointing: bool = False
    teacher_offload: str = "none"


@dataclass
class RunConfig:
    """A whole experiment: teacher + student + loss + data + optimisation + trainer + evaluation."""

    name: str = "run"
    seed: int = 0
    out_dir: str = "runs/${name}"
    teacher: dict[str, Any] = field(default_factory=lambda: {"name": "digits"})
    student: dict[str, Any] = field(default_factory=lambda: {"name": "consistency", "init": "teacher"})
    loss: dict[str, Any] = field(default_factory=lambda: {"name": "cd"})
    data: DataConfig = field(default_factory=DataConfig)
    optim: dict[str, OptimConfig] = field(default_factory=lambda: {"student": OptimConfig()})
    ema: EMAConfig = field(default_factory=EMAConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    model: ModelConfig = field(default_factory=ModelConfig)


def _one_line(exc: BaseException) -> str:
    msg = str(exc).strip().splitlines()
    return msg[0] if msg else type(exc).__name__


def _valid_keys(node: Any) -> str:
    return ", ".join(sorted(str(k) for k in node.keys())) if isinstance(node, DictConfig) else "?"


def load_config(path: str | Path | None, overrides: list[str] | None = None, base: type = RunConfig) -> DictConfig:
    """Merge the structured defaults, the YAML file at ``path`` and ``key=value`` overrides.

    Raises :class:`ConfigError` (one line) on a missing file, a YAML syntax error, an unknown key or a bad value.
    """
    schema = OmegaConf.structured(base)
    layers = [schema]
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            layers.append(OmegaConf.load(path))
        except Exception as exc:  # yaml errors are multi-line
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {_one_line(exc)}") from None
    for ov in overrides or []:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} is not of the form key=value")
        try:
            layers.append(OmegaConf.from_dotlist([ov]))
        except Exception as exc:
            raise ConfigError(f"bad override {ov!r}: {_one_line(exc)}") from None
    cfg = schema
    for layer in layers[1:]:
        try:
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as exc:
            key = getattr(exc, "full_key", None) or ""
            parent = key.rsplit(".", 1)[0] if "." in key else ""
            node = OmegaConf.select(schema, parent) if parent else schema
            if "not in" in str(exc) or "Key" in str(exc):
                raise ConfigError(f"unknown config key {key!r}; valid keys here: {_valid_keys(node)}") from None
            raise ConfigError(f"bad config value for {key!r}: {_one_line(exc)}") from None
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"cannot resolve config: {_one_line(exc)}") from None
    return cfg


def to_container(cfg: DictConfig | ListConfig | dict) -> Any:
    """A plain, JSON/YAML-serialisable copy of a config."""
    if isinstance(cfg, (DictConfig, ListConfig)):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def save_config(cfg: DictConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (saved with every run)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
