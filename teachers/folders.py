"""Loading a teacher from a **local** diffusers pipeline folder (teacher ``diffusers``) and the prompt-embedding cache
of the text-conditional teachers (:mod:`teachers.latent`).

**Prompts.** A text teacher is distilled on a fixed prompt set: ``prompts`` is a text file (one prompt per line, blank
lines skipped) or a list. The prompt embeddings of every prompt and of the empty prompt (classifier-free guidance's
null condition) are computed once, by the pipeline class's own ``encode_prompt`` (so they are exactly what the
pipeline feeds its denoiser, including SDXL's zeroed negative embeddings when ``force_zeros_for_empty_prompt``), and
cached in ``cache_dir`` (default ``<folder>/distill_prompt_cache/``) as one safetensors file named by a hash of the
prompts, the pipeline class and the text encoders' and tokenizers' configs. On a cache hit the text encoders are not
loaded at all. :meth:`TextLatentTeacher.sample_cond` draws prompts uniformly and returns a
:class:`distill.core.cond.Cond` with ``embeds [B, L, D]`` and ``mask [B, L]`` (the tokenizer's attention mask; the
UNet, like the pipeline, does not consume it), plus ``pooled [B, P]`` and ``added["time_ids"] [B, 6]`` for SDXL-style
UNets (original size = target size = the pixel size, crop (0, 0)) and ``pooled`` for SD3.

**Loading** (:func:`load_diffusers_folder`, registered as teacher ``diffusers``): the kind comes from
``model_index.json``'s ``_class_name`` (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``DiTPipeline``,
``StableDiffusion3Pipeline``, ``DDPMPipeline``/``DDIMPipeline`` for the pixel teacher) or, without one, from the model
class in ``unet/config.json`` / ``transformer/config.json``. A wrong or incomplete folder fails with one line naming
the missing part and what is valid. Nothing is downloaded (``local_files_only``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .diffusers_teacher import TEACHER_META, DiffusersTeacher, load_diffusers_teacher, scheduler_family
from .latent import DiTTeacher, TextLatentTeacher

__all__ = ["PIPELINE_KINDS", "folder_kind", "load_diffusers_folder", "read_prompts"]


#: pipeline ``_class_name`` (``model_index.json``) -> teacher kind
PIPELINE_KINDS = {
    "DDPMPipeline": "pixel",
    "DDIMPipeline": "pixel",
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sd",
    "DiTPipeline": "dit",
    "StableDiffusion3Pipeline": "sd3",
}
#: network ``_class_name`` (``unet/`` or ``transformer/`` ``config.json``) -> teacher kind
MODEL_KINDS = {
    "UNet2DModel": "pixel",
    "UNet2DConditionModel": "sd",
    "DiTTransformer2DModel": "dit",
    "SD3Transformer2DModel": "sd3",
}
#: the pipeline class used to encode prompts when the folder has no model_index.json
DEFAULT_PIPELINE = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
                    "sd3": "StableDiffusion3Pipeline", "dit": "DiTPipeline"}


def read_prompts(prompts: str | Path | Sequence[str]) -> list[str]:
    """The prompt list: a text file (one prompt per line, blank lines skipped) or a sequence of strings."""
    if isinstance(prompts, (str, Path)):
        path = Path(prompts)
        if not path.is_file():
            raise FileNotFoundError(f"prompts file {str(path)!r} does not exist (a text file, one prompt per line)")
        out = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    else:
        out = [str(p) for p in prompts]
    if not out:
        raise ValueError(f"no prompts in {prompts!r}: give at least one (a text file, one prompt per line)")
    return out


def _hash_json(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _text_parts(path: Path) -> list[str]:
    """The text-encoder and tokenizer subfolders present (``text_encoder``, ``tokenizer``, ``..._2``, ``..._3``)."""
    names = ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3")
    return [n for n in names if (path / n).is_dir()]


def _cache_key(path: Path, pipeline: str, prompts: list[str], extra: dict[str, Any]) -> str:
    """Hash of the prompts, the pipeline class and every text-encoder / tokenizer config file (and the weight
    files' sizes), so a changed encoder or prompt set gets a new cache file."""
    parts: dict[str, Any] = {"prompts": prompts, "pipeline": pipeline, **extra}
    for sub in _text_parts(path):
        for f in sorted((path / sub).iterdir()):
            if f.suffix in (".json", ".txt", ".model"):
                parts[f"{sub}/{f.name}"] = hashlib.sha256(f.read_bytes()).hexdigest()
            elif f.is_file():
                parts[f"{sub}/{f.name}"] = f.stat().st_size
    return _hash_json(parts)[:20]


@torch.no_grad()
def _encode_prompts(pipe: Any, kind: str, prompts: list[str], pixel_hw: tuple[int, int],
                    batch_size: int = 64) -> dict[str, Tensor]:
    """Embeddings of ``prompts`` and of the empty prompt via ``pipe.encode_prompt`` (classifier-free-guidance mode,
    so the negative half is exactly the pipeline's null condition)."""
    rows: dict[str, list[Tensor]] = {}
    null: dict[str, Tensor] = {}
    dev = torch.device("cpu")
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        kw = dict(prompt=chunk, device=dev, num_images_per_prompt=1, do_classifier_free_guidance=True)
        if kind == "sd":
            pe, ne = pipe.encode_prompt(**kw, negative_prompt=None)
            got = {"embeds": pe, "null_embeds": ne}
        else:  # SDXL and SD3 return (embeds, negative embeds, pooled, negative pooled)
            more = {"prompt_2": None} if kind == "sdxl" else {"prompt_2": None, "prompt_3": None}
            pe, ne, pp, npp = pipe.encode_prompt(**kw, **more)
            got = {"embeds": pe, "null_embeds": ne, "pooled": pp, "null_pooled": npp}
        for k, v in got.items():
            if k.startswith("null_"):
                null.setdefault(k, v[:1].float().cpu())
            else:
                rows.setdefault(k, []).append(v.float().cpu())
    table = {k: torch.cat(v).contiguous() for k, v in rows.items()}
    table.update({k: v.contiguous() for k, v in null.items()})
    tok = getattr(pipe, "tokenizer", None)
    if kind in ("sd", "sdxl") and tok is not None:  # the first tokenizer's attention mask (information only)
        L = table["embeds"].shape[1]

        def mask_of(texts: list[str]) -> Tensor:
            return tok(texts, padding="max_length", max_length=L, truncation=True, return_tensors="pt").attention_mask

        table["mask"] = mask_of(prompts).long().contiguous()
        table["null_mask"] = mask_of([""]).long().contiguous()
    if kind == "sdxl":
        proj = int(pipe.text_encoder_2.config.projection_dim)
        ids = pipe._get_add_time_ids(pixel_hw, (0, 0), pixel_hw, dtype=torch.float32,
                                     text_encoder_projection_dim=proj)
        table["time_ids"] = ids.float().reshape(1, -1).expand(len(prompts), -1).contiguous()
    return table


# ---------------------------------------------------------------------------------------------------------------
# Folder checks and loading
# ---------------------------------------------------------------------------------------------------------------

def _fail(path: Path, what: str) -> None:
    raise FileNotFoundError(f"teacher folder {str(path)!r}: {what}")


def _read_json(file: Path) -> dict[str, Any]:
    return json.loads(file.read_text())


def _model_class(path: Path, sub: str) -> str | None:
    f = path / sub / "config.json"
    return _read_json(f).get("_class_name") if f.is_file() else None


def folder_kind(path: str | Path) -> tuple[str, str | None]:
    """``(kind, pipeline class)`` of a teacher folder: ``pixel``, ``sd``, ``sdxl``, ``dit`` or ``sd3``, from
    ``model_index.json`` or, without one, from the network's ``config.json``. Raises one line if neither tells."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"teacher folder {str(path)!r} does not exist (a local diffusers folder is expected; "
                                "hub ids are not fetched)")
    index = path / "model_index.json"
    pipeline = None
    if index.is_file():
        meta = _read_json(index)
        pipeline = meta.get("_class_name")
        if pipeline not in PIPELINE_KINDS:
            raise ValueError(f"teacher folder {str(path)!r}: unsupported pipeline {pipeline!r} in model_index.json; "
                             f"valid: {', '.join(PIPELINE_KINDS)}")
        for comp, spec in meta.items():
            if comp.startswith("_") or not isinstance(spec, list) or spec[0] is None or spec[1] is None:
                continue
            if not (path / comp).is_dir():
                _fail(path, f"model_index.json names component {comp!r} ({spec[1]}) but {comp}/ is missing")
        kind = PIPELINE_KINDS[pipeline]
    else:
        classes = {sub: _model_class(path, sub) for sub in ("unet", "transformer")}
        found = [(sub, c) for sub, c in classes.items() if c is not None]
        if not found:
            _fail(path, "no model_index.json and no unet/config.json or transformer/config.json (valid: a diffusers "
                        "pipeline folder saved with save_pretrained)")
        sub, cls = found[0]
        if cls not in MODEL_KINDS:
            raise ValueError(f"teacher folder {str(path)!r}: unsupported model {cls!r} in {sub}/config.json; valid: "
                             f"{', '.join(MODEL_KINDS)}")
        kind = MODEL_KINDS[cls]
    if kind == "sd" and ((path / "text_encoder_2").is_dir() or pipeline == "StableDiffusionXLPipeline"):
        kind = "sdxl"
    return kind, pipeline


def _check_parts(path: Path, kind: str) -> None:
    """One-line errors for a folder that lacks what ``kind`` needs."""
    net = "transformer" if kind in ("dit", "sd3") else "unet"
    if not (path / net / "config.json").is_file():
        _fail(path, f"missing {net}/config.json (a {kind} teacher needs its {net}/ folder saved with save_pretrained)")
    cls = _model_class(path, net)
    want = {"sd": "UNet2DConditionModel", "sdxl": "UNet2DConditionModel", "dit": "DiTTransformer2DModel",
            "sd3": "SD3Transformer2DModel", "pixel": "UNet2DModel"}[kind]
    if cls != want:
        raise ValueError(f"teacher folder {str(path)!r}: {net}/config.json is a {cls!r}, but a {kind} folder needs "
                         f"{want!r}")
    sched = path / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        _fail(path, "missing scheduler/scheduler_config.json (valid: any scheduler of the EDM, VP or flow families)")
    try:
        family = scheduler_family(_read_json(sched))
    except ValueError as err:
        raise ValueError(f"teacher folder {str(path)!r}: {err}") from None
    if kind == "sd3" and family != "flow":
        raise ValueError(f"teacher folder {str(path)!r}: an SD3 transformer needs a flow-matching scheduler "
                         f"(FlowMatchEulerDiscreteScheduler), got {_read_json(sched).get('_class_name')!r}")
    if kind == "pixel":
        return
    if not (path / "vae" / "config.json").is_file():
        _fail(path, f"missing vae/config.json: a latent {net} ({cls}) needs its AutoencoderKL in vae/")
    if kind == "dit":
        return
    pairs = [("text_encoder", "tokenizer"), ("text_encoder_2", "tokenizer_2")]
    if kind == "sd3":
        pairs.append(("text_encoder_3", "tokenizer_3"))
    for i, (enc, tok) in enumerate(pairs):
        has_enc, has_tok = (path / enc).is_dir(), (path / tok).is_dir()
        if has_tok and not has_enc:
            _fail(path, f"{tok}/ without {enc}/ (a tokenizer needs its text encoder)")
        if has_enc and not has_tok:
            _fail(path, f"{enc}/ without {tok}/ (a text encoder needs its tokenizer)")
        required = i == 0 or (i == 1 and kind in ("sdxl", "sd3"))
        if required and not has_enc:
            _fail(path, f"missing {enc}/ and {tok}/: a {kind} teacher encodes its prompts with them")
        if has_enc and not (path / enc / "config.json").is_file():
            _fail(path, f"missing {enc}/config.json")


def _load_model(cls_name: str, folder: Path, library: str = "diffusers") -> Any:
    """``<cls>.from_pretrained(folder, local_files_only=True)``; a failure (e.g. weights that do not fit the
    config) becomes one line naming the folder."""
    import diffusers
    import transformers

    cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
    try:
        if library == "diffusers":
            return cls.from_pretrained(folder, local_files_only=True)
        return cls.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised as one line naming the part
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"cannot load {folder.name}/ as {cls_name}: {first}") from err


def _text_components(path: Path) -> dict[str, Any]:
    """The text encoders and tokenizers of the folder, by component name (classes from their configs or from
    model_index.json)."""
    import transformers

    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    out: dict[str, Any] = {}
    for sub in _text_parts(path):
        spec = index.get(sub)
        if isinstance(spec, list) and spec[1]:
            cls = spec[1]
        elif sub.startswith("text_encoder"):
            cls = (_read_json(path / sub / "config.json").get("architectures") or ["CLIPTextModel"])[0]
        else:
            cls = "AutoTokenizer"
        if not hasattr(transformers, cls):
            raise ValueError(f"teacher folder {str(path)!r}: {sub}/ has unknown transformers class {cls!r}")
        out[sub] = _load_model(cls, path / sub, "transformers")
    return out


def _prompt_table(path: Path, kind: str, pipeline: str | None, prompts: list[str], cache_dir: Path,
                  components: dict[str, Any], pixel_hw: tuple[int, int]) -> dict[str, Tensor]:
    """The cached prompt tables (computing and writing them on a miss)."""
    from safetensors.torch import load_file, save_file

    pipeline = pipeline or DEFAULT_PIPELINE[kind]
    index = _read_json(path / "model_index.json") if (path / "model_index.json").is_file() else {}
    cfg_extra = {k: v for k, v in index.items() if not k.startswith("_") and not isinstance(v, list)}
    key = _cache_key(path, pipeline, prompts, {"pipeline_config": cfg_extra, "pixel_hw": list(pixel_hw)})
    file = Path(cache_dir) / f"prompts_{key}.safetensors"
    if file.is_file():
        return load_file(str(file))
    import diffusers

    text = _text_components(path)
    pipe_cls = getattr(diffusers, pipeline)
    init = {**components, **text}
    if kind == "sd":
        init.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif kind == "sdxl":
        init.setdefault("text_encoder_2", None)
        init.setdefault("tokenizer_2", None)
        init["force_zeros_for_empty_prompt"] = bool(cfg_extra.get("force_zeros_for_empty_prompt", True))
    elif kind == "sd3":
        init.setdefault("text_encoder_3", None)
        init.setdefault("tokenizer_3", None)
    pipe = pipe_cls(**init)
    table = _encode_prompts(pipe, kind, prompts, pixel_hw)
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    save_file(table, str(tmp), metadata={"prompts": json.dumps(prompts)})
    tmp.replace(file)
    return table


def load_diffusers_folder(path: str | Path, prompts: str | Sequence[str] | None = None,
                          cache_dir: str | Path | None = None, **overrides: Any) -> DiffusersTeacher:
    """Load any supported teacher from a **local** diffusers folder (module docstring; nothing is downloaded).

    Args:
        path: the folder (a pipeline saved with ``save_pretrained``, or ``unet/`` + ``scheduler/`` for pixel UNets).
        prompts: text-to-image teachers only: a prompts file (one prompt per line) or a list of prompts.
        cache_dir: where the prompt embeddings are cached (default ``<path>/distill_prompt_cache``).
        **overrides: ``sigma_data``, ``sigma_min``, ``sigma_max`` (and, for pixel teachers, the keys of
            ``distill_teacher.json``: ``null_class``, ``edm_timestep_scale``).
    """
    path = Path(path)
    kind, pipeline = folder_kind(path)
    if kind == "pixel":
        if prompts is not None:
            raise ValueError(f"teacher folder {str(path)!r} is an unconditional/class-conditional pixel UNet; "
                             "'prompts' is only for text-to-image teachers")
        return load_diffusers_teacher(path, **overrides)
    _check_parts(path, kind)
    allowed = {"sigma_data", "sigma_min", "sigma_max"}
    bad = sorted(set(overrides) - allowed)
    if bad:
        raise ValueError(f"unknown key(s) {bad} for a {kind} teacher; valid keys: path, prompts, cache_dir, "
                         f"{', '.join(sorted(allowed))}")
    meta_file = path / TEACHER_META
    meta = {k: v for k, v in (_read_json(meta_file) if meta_file.is_file() else {}).items() if k in allowed}
    meta.update(overrides)
    sched = _read_json(path / "scheduler" / "scheduler_config.json")
    vae = _load_model("AutoencoderKL", path / "vae")
    net_sub = "transformer" if kind in ("dit", "sd3") else "unet"
    net = _load_model(_model_class(path, net_sub), path / net_sub)
    extra = {"kind": kind, "pipeline": pipeline or DEFAULT_PIPELINE[kind], "folder": str(path)}
    if kind == "dit":
        if prompts is not None:
            raise ValueError(f"teacher folder {str(path)!r} is a class-conditional DiT; 'prompts' is only for "
                             "text-to-image teachers")
        return DiTTeacher(net, vae, sched, extra=extra, **meta)
    if prompts is None:
        raise ValueError(f"teacher folder {str(path)!r} is a text-to-image {kind} teacher: set prompts (a text file, "
                         "one prompt per line)")
    plist = read_prompts(prompts)
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    shape = DiffusersTeacher._shape_of(net)
    pixel_hw = (shape[1] * f, shape[2] * f)
    components = {net_sub: net, "vae": vae, "scheduler": _scheduler(sched)}
    table = _prompt_table(path, kind, pipeline, plist, Path(cache_dir or path / "distill_prompt_cache"), components,
                          pixel_hw)
    return TextLatentTeacher(net, vae, sched, plist, table, extra=extra, **meta)


def _scheduler(cfg: dict[str, Any]) -> Any:
    """The diffusers scheduler object of a config (pipelines need one to be constructed)."""
    import diffusers

    return getattr(diffusers, cfg["_class_name"]).from_config(cfg)
