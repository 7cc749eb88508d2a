"""Tiny random diffusers pipelines saved with ``save_pretrained``: the teacher folders the latent-teacher tests load.

Every builder writes a complete pipeline folder (``model_index.json`` and one subfolder per component, exactly what
``<Pipeline>.save_pretrained`` writes and users have on disk) into ``root`` and returns its path. The networks are
random (seeded) and small (thousands to tens of thousands of parameters); the CLIP tokenizer is built from a tiny
local ``vocab.json`` / ``merges.txt`` written here (lower-case letters, digits and a few punctuation marks, each as a
word-internal and a word-final ``</w>`` token, plus two merges), so nothing is downloaded.

* :func:`sd_folder` - ``StableDiffusionPipeline``: ``UNet2DConditionModel`` (8x8x4 latents, cross-attention dim 16),
  ``AutoencoderKL`` (16x16x3 pixels, factor 2), ``CLIPTextModel`` (hidden 16, 1 layer), ``CLIPTokenizer``
  (``model_max_length`` 16), ``DDIMScheduler`` (SD's scaled-linear betas).
* :func:`sdxl_folder` - ``StableDiffusionXLPipeline``: as above plus ``CLIPTextModelWithProjection`` /
  ``tokenizer_2`` and a UNet with ``addition_embed_type="text_time"``; ``EulerDiscreteScheduler``.
* :func:`dit_folder` - ``DiTPipeline``: ``DiTTransformer2DModel`` (10 classes, learned sigma: 8 output channels),
  the same VAE, ``DDIMScheduler``.
* :func:`sd3_folder` - ``StableDiffusion3Pipeline``: ``SD3Transformer2DModel``, two ``CLIPTextModelWithProjection``
  encoders (no T5: diffusers' pipeline feeds zeros in its place), ``FlowMatchEulerDiscreteScheduler``.
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch

PROMPTS = ["a red cat", "the blue sea", "two dogs", "a tree at night", "the cat"]

_CHARS = list(string.ascii_lowercase) + list("0123456789.,!?")


def write_clip_vocab(folder: Path) -> tuple[Path, Path]:
    """A tiny CLIP BPE vocabulary: ``vocab.json`` and ``merges.txt`` in ``folder``; returns their paths."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in _CHARS:
        vocab[c] = len(vocab)
    for c in _CHARS:
        vocab[c + "</w>"] = len(vocab)
    vocab["th"] = len(vocab)
    vocab["the</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\nt h\nth e</w>\n")
    return folder / "vocab.json", folder / "merges.txt"


def tiny_tokenizer(root: Path, max_length: int = 16):
    """A ``CLIPTokenizer`` over the tiny vocabulary (written under ``root/_vocab``)."""
    from transformers import CLIPTokenizer

    vocab, merges = write_clip_vocab(root / "_vocab")
    return CLIPTokenizer(str(vocab), str(merges), model_max_length=max_length)


def _clip_config(hidden: int = 16, projection: int = 16):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1, num_attention_heads=2,
                          vocab_size=len(_CHARS) * 2 + 4, max_position_embeddings=16, projection_dim=projection,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)


def tiny_vae():
    """``AutoencoderKL``: 3 -> 4 channels, downsampling factor 2, scaling factor 0.5."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), layers_per_block=1,
                         latent_channels=4, norm_num_groups=4, sample_size=16, scaling_factor=0.5)


def _unet(cross_attention_dim: int = 16, **kw):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
                                cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=4, **kw)


def _save(pipe, root: Path, name: str) -> Path:
    out = root / name
    pipe.save_pretrained(out)
    return out


def sd_folder(root: Path, seed: int = 0, prediction_type: str = "epsilon") -> Path:
    """A tiny ``StableDiffusionPipeline`` folder (module docstring)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(_clip_config()),
                                   tokenizer=tiny_tokenizer(root), unet=_unet(), scheduler=sched, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    return _save(pipe, root, "sd")


def sdxl_folder(root: Path, seed: int = 0) -> Path:
    """A tiny ``StableDiffusionXLPipeline`` folder (two CLIP encoders, ``text_time`` added conditions)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    unet = _unet(cross_attention_dim=32, addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=6 * 4 + 16)
    sched = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   steps_offset=1, timestep_spacing="leading")
    tok = tiny_tokenizer(root)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=CLIPTextModel(_clip_config()),
                                     text_encoder_2=CLIPTextModelWithProjection(_clip_config()), tokenizer=tok,
                                     tokenizer_2=tok, unet=unet, scheduler=sched, force_zeros_for_empty_prompt=True,
                                     add_watermarker=False)
    return _save(pipe, root, "sdxl")


def dit_folder(root: Path, seed: int = 0) -> Path:
    """A tiny ``DiTPipeline`` folder (10 classes, learned-sigma output)."""
    from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    torch.manual_seed(seed)
    net = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=1, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    sched = DDIMScheduler(beta_schedule="linear", clip_sample=False, set_alpha_to_one=False)
    pipe = DiTPipeline(transformer=net, vae=tiny_vae(), scheduler=sched)
    return _save(pipe, root, "dit")


def sd3_folder(root: Path, seed: int = 0) -> Path:
    """A tiny ``StableDiffusion3Pipeline`` folder (two CLIP encoders with projection, no T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed)
    net = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=1,
                                attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                caption_projection_dim=16, pooled_projection_dim=32, pos_embed_max_size=8)
    tok = tiny_tokenizer(root)
    pipe = StableDiffusion3Pipeline(transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                                    vae=tiny_vae(), text_encoder=CLIPTextModelWithProjection(_clip_config()),
                                    tokenizer=tok, text_encoder_2=CLIPTextModelWithProjection(_clip_config()),
                                    tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    return _save(pipe, root, "sd3")


def write_prompts(root: Path, prompts: list[str] | None = None) -> Path:
    """``root/prompts.txt`` (one prompt per line)."""
    root.mkdir(parents=True, exist_ok=True)
    f = root / "prompts.txt"
    f.write_text("\n".join(prompts or PROMPTS) + "\n")
    return f


#: kind -> the builder of its tiny pipeline folder (``scripts/make_tiny_teacher.py`` uses the same names)
BUILDERS = {"sd": sd_folder, "sdxl": sdxl_folder, "dit": dit_folder, "sd3": sd3_folder}


def all_folders(root: Path) -> dict[str, Path]:
    """Every tiny pipeline folder under ``root`` (keyed by kind) and ``prompts`` (the prompts file): the tests'
    ``folders`` fixtures."""
    out = {k: build(root) for k, build in BUILDERS.items()}
    out["prompts"] = write_prompts(root)
    return out


def write_run_config(path: Path, *, name: str, out_dir: Path, teacher: Path, prompts: Path | None, cache_dir: Path,
                     student: str, loss: str, phases: dict[str, str], lr: float = 1e-4, batch_size: int = 4,
                     ema: float = 0.9, steps: int = 3, nfe: tuple[int, ...] = (1,), extra: str = "") -> Path:
    """A ``distill train`` config for a few iterations on a tiny teacher folder (tests and
    ``scripts/bench_memory.py``): ``phases`` maps each optimizer phase to extra optimizer keys (e.g.
    ``", betas: [0.0, 0.999]"``); ``prompts=None`` for label-conditional (DiT) teachers; ``extra`` is appended."""
    optim = "\n".join(f"  {ph}: {{name: adam, lr: {lr}{x}}}" for ph, x in phases.items())
    prompt_key = "" if prompts is None else f", prompts: {prompts}"
    path.write_text(f"""name: {name}
out_dir: {out_dir}
teacher: {{name: diffusers, path: {teacher}{prompt_key}, cache_dir: {cache_dir}}}
student: {{name: {student}, init: teacher}}
loss: {loss}
data: {{name: null, batch_size: {batch_size}}}
optim:
{optim}
ema: {{decay: {ema}}}
trainer: {{max_steps: {steps}, log_every: 1, ckpt_every: 0, grid_every: 0, progress_bar: false, num_threads: 1}}
eval: {{nfe: [{', '.join(map(str, nfe))}], every: 0}}
{extra}""")
    return path
