"""``distill export`` of students of the latent teachers (:mod:`teachers.latent`) into the diffusers pipeline folder
their teacher came from, and what a latent export needs to sample without the teacher.

**Pipeline folder** (``<export>/diffusers/``, :func:`export_latent_pipeline`): the teacher folder's
``model_index.json`` and every component but the network and the scheduler copied unchanged (VAE, text encoders,
tokenizers), the student's network in ``unet/`` or ``transformer/``, and a scheduler that reproduces the toolkit's
sampler (:func:`students.sample_student`):

* VP teachers (``StableDiffusionPipeline``, ``StableDiffusionXLPipeline``, ``DiTPipeline``): ``LCMScheduler`` with
  the teacher's beta table, ``prediction_type="epsilon"`` and ``timestep_scaling = 1e15`` so that LCM's own boundary
  scalings are the identity (``c_skip < 1e-30``, ``c_out = 1`` in float32). A step is then ``x0 = (x_t - sqrt(1 -
  abar_t) eps) / sqrt(abar_t)``, re-noised to the next timestep with fresh noise: the toolkit's ``gamma = 1``
  (multistep consistency) sampling in VP coordinates. A generator student of an epsilon teacher exports its UNet
  unchanged; any other (a consistency student, whose boundary ``c(s)`` LCM's scalings cannot express, or a
  v-/sample-prediction teacher's copy) exports as :class:`distill.pipeline_model.EpsilonUNet2DConditionModel` /
  ``EpsilonDiTTransformer2DModel``, the same weights returning ``a[t] x_t + b[t] F`` with per-timestep tables
  ``a = (1 - c_skip) / (sigma c_in)``, ``b = -c_out / sigma`` from the student's own scalings; that class ships as
  ``distill_pipeline_model.py`` in the network folder and loads with ``trust_remote_code=True``. The levels of each
  NFE are snapped to the nearest integer timestep (``timesteps=[...]``; the sampled levels are listed).
* Rectified flow (``StableDiffusion3Pipeline``): ``FlowMatchEulerDiscreteScheduler`` with ``shift=1`` (the export's
  ``sigmas=[...]`` are used as given), ``stochastic_sampling`` for ``gamma = 1`` (deterministic Euler for
  ``gamma = 0``: the flow map jump ``J(x, s, u)`` in flow coordinates); a generator's velocity is its network output;
  a consistency student exports as :class:`distill.pipeline_model.VelocitySD3Transformer2DModel`.

Initial latents: the pipelines start from ``latents`` at the first level in *their* coordinates; the toolkit starts
from ``sigma_max z`` in VE units, which is ``latents = sqrt(1 - abar_T) z`` (VP) or ``t_max z`` (flow). The export
records that factor (``latents_scale``).

**Standalone latent export** (:func:`write_latent_extras`): ``vae/`` (the teacher's ``AutoencoderKL``) and, for a
text teacher, ``prompts.safetensors`` (its prompt-embedding table and the prompts), so ``distill sample/eval
--student`` decode to pixels and draw the teacher's prompts without loading the teacher
(:func:`exported_eval_kwargs`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from distill.core.cond import Cond

__all__ = ["export_latent_pipeline", "write_latent_extras", "exported_eval_kwargs", "LCM_TIMESTEP_SCALING"]

#: ``LCMScheduler.timestep_scaling`` that makes its boundary scalings the identity for timesteps >= 1
LCM_TIMESTEP_SCALING = 1e15
MODEL_FILE = "distill_pipeline_model"
PROMPTS_FILE = "prompts.safetensors"


def _teacher_folder(cfg: dict[str, Any]) -> Path | None:
    t = cfg.get("teacher") or {}
    return Path(t["path"]) if t.get("name") == "diffusers" and t.get("path") else None


def _snap_vp(levels: list[float], log_sigmas: Tensor) -> list[int]:
    """The integer timesteps whose sigma is nearest (in log) to each level."""
    ls = log_sigmas.double()
    return [int((ls - torch.tensor(float(s), dtype=torch.float64).log()).abs().argmin()) for s in levels]


def export_latent_pipeline(student: Any, folder: Path, sampling: dict[str, Any],
                           cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Write ``folder`` (module docstring) for a student of a latent teacher; return ``(model-card paragraph,
    the "pipeline" record for sampling.json)``. Raises ``NotImplementedError`` with the one-line reason for students
    no pipeline can sample faithfully."""
    from teachers.folders import folder_kind

    from .pipeline_model import TABLE_SIZE

    src = _teacher_folder(cfg)
    if src is None:
        raise NotImplementedError("the teacher is not a diffusers pipeline folder")
    kind, pipeline = folder_kind(src)
    if kind == "pixel":
        raise NotImplementedError("pixel UNet students export to ConsistencyModelPipeline only (EDM teachers)")
    if not (src / "model_index.json").is_file():
        raise NotImplementedError(f"the teacher folder {str(src)!r} has no model_index.json to build a pipeline on")
    index = json.loads((src / "model_index.json").read_text())
    pipeline = index["_class_name"]
    skind = getattr(student, "kind", "?")
    if skind not in ("generator", "consistency"):
        raise NotImplementedError(f"a {skind} student has no {pipeline} scheduler (generator and consistency "
                                  "students export)")
    if student.takes_guidance:
        raise NotImplementedError(f"{pipeline} cannot pass this student's guidance input")
    net_sub = "transformer" if kind in ("dit", "sd3") else "unet"
    net = student.net.unet
    family = student.precond.family
    want = "flow" if kind == "sd3" else "vp"
    if family != want:
        raise NotImplementedError(f"a {family}-family student cannot run in {pipeline}'s {want} scheduler")
    gamma = float(sampling["gamma"])
    levels = {k: list(v[:-1]) for k, v in sampling["sigmas"].items()}
    import diffusers

    sched_cfg = dict(json.loads((src / "scheduler" / "scheduler_config.json").read_text()))
    record: dict[str, Any] = {"class": pipeline, "trust_remote_code": False}
    wrapped = None
    if want == "vp":
        log_sigmas = student.precond.log_sigmas.double()
        sig = log_sigmas.exp()
        with torch.no_grad():
            c_skip, c_out, c_in, _ = (v.double() for v in student.precond.scalings(sig))
        a, b = (1 - c_skip) / (sig * c_in), -c_out / sig
        if not (bool((a == 0).all()) and bool((b == 1).all())):
            if sig.numel() != TABLE_SIZE:
                raise NotImplementedError(f"the exported network's timestep table has {TABLE_SIZE} entries, the "
                                          f"teacher's scheduler {sig.numel()}")
            wrapped = "EpsilonDiTTransformer2DModel" if kind == "dit" else "EpsilonUNet2DConditionModel"
        scheduler = diffusers.LCMScheduler.from_config(
            {k: v for k, v in sched_cfg.items() if not k.startswith("_")}, timestep_scaling=LCM_TIMESTEP_SCALING,
            prediction_type="epsilon", clip_sample=False, thresholding=False)
        timesteps, snapped = {}, {}
        for k, lv in levels.items():
            ts = _snap_vp(lv, log_sigmas)
            if len(set(ts)) != len(ts) or min(ts) < 1:
                continue
            timesteps[k] = ts
            snapped[k] = [float(sig[t]) for t in ts] + [0.0]
        if kind == "dit":  # DiTPipeline takes num_inference_steps only: LCM's own timesteps
            timesteps, snapped = {}, {}
            for k in levels:
                scheduler.set_timesteps(int(k))
                ts = [int(t) for t in scheduler.timesteps]
                timesteps[k], snapped[k] = ts, [float(sig[t]) for t in ts] + [0.0]
        abar_top = 1 / (1 + float(sig[timesteps[min(timesteps, key=int)][0]]) ** 2) if timesteps else None
        record.update(scheduler="LCMScheduler", timesteps=timesteps, levels=snapped,
                      latents_scale=None if abar_top is None else (1 - abar_top) ** 0.5)
    else:
        if skind == "consistency":
            wrapped = "VelocitySD3Transformer2DModel"
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_config(
            {k: v for k, v in sched_cfg.items() if not k.startswith("_")}, shift=1.0, use_dynamic_shifting=False,
            stochastic_sampling=gamma == 1.0)
        ts = {k: [s / (1 + s) for s in lv] for k, lv in levels.items()}
        record.update(scheduler="FlowMatchEulerDiscreteScheduler", sigmas=ts,
                      levels={k: list(v) + [0.0] for k, v in levels.items()},
                      latents_scale=ts[min(ts, key=int)][0] if ts else None)
    record["no_t5"] = kind == "sd3" and not (src / "text_encoder_3").is_dir()
    record["exact_multistep"] = gamma == 1.0 or (want == "flow" and gamma == 0.0)
    folder.mkdir(parents=True)
    for comp, spec in index.items():
        if comp.startswith("_") or comp in (net_sub, "scheduler") or not isinstance(spec, list) or spec[0] is None:
            continue
        shutil.copytree(src / comp, folder / comp)
    scheduler.save_pretrained(folder / "scheduler")
    index["scheduler"] = ["diffusers", type(scheduler).__name__]
    if wrapped is None:
        net.save_pretrained(folder / net_sub, safe_serialization=True)
    else:
        from . import pipeline_model

        out = getattr(pipeline_model, wrapped).from_config(net.config)
        missing, unexpected = out.load_state_dict(net.state_dict(), strict=False)
        if unexpected or any(not m.startswith("distill_") for m in missing):
            raise RuntimeError(f"wrapped network does not fit: {unexpected[:3]} {missing[:3]}")
        with torch.no_grad():
            if want == "vp":
                out.distill_eps_x.copy_(a)
                out.distill_eps_out.copy_(b)
            else:
                out.distill_boundary.copy_(torch.tensor(
                    [student.sigma_data, student.precond.eps, float(sched_cfg.get("num_train_timesteps", 1000))],
                    dtype=torch.float64))
        out.save_pretrained(folder / net_sub, safe_serialization=True)
        shutil.copy(Path(pipeline_model.__file__), folder / net_sub / f"{MODEL_FILE}.py")
        cfg_file = folder / net_sub / "config.json"
        ncfg = json.loads(cfg_file.read_text())
        ncfg["_class_name"] = wrapped
        cfg_file.write_text(json.dumps(ncfg, indent=2))
        index[net_sub] = [MODEL_FILE, wrapped]
        record["trust_remote_code"] = True
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))
    return _card(pipeline, record, wrapped, net_sub, gamma), record


def _card(pipeline: str, rec: dict[str, Any], wrapped: str | None, net_sub: str, gamma: float) -> str:
    trust = ", trust_remote_code=True" if wrapped else ""
    if pipeline == "StableDiffusion3Pipeline" and rec.get("no_t5"):
        trust += ", text_encoder_3=None, tokenizer_3=None"
    lines = [f"`diffusers/` loads in diffusers' `{pipeline}` with `{rec['scheduler']}`:\n",
             f"```python\nfrom diffusers import {pipeline}\n"
             f"pipe = {pipeline}.from_pretrained('<this folder>/diffusers'{trust})\n```\n"]
    if wrapped:
        lines.append(f"`{net_sub}/` is `{wrapped}` (`{net_sub}/{MODEL_FILE}.py`, plain diffusers + torch): the "
                     "student's weights with its consistency boundary folded into the output, because the "
                     "scheduler's own "
                     "boundary scalings cannot express it; hence `trust_remote_code=True`.\n")
    guidance = "`guidance_scale=1.0` (the student is unguided: guidance, if any, was distilled into it)"
    if pipeline == "DiTPipeline":
        lines.append(f"Call `pipe(class_labels=[...], num_inference_steps=N, guidance_scale=1.0)`; {guidance}. "
                     "DiTPipeline takes no timesteps or latents: the timesteps are LCMScheduler's own for N steps, "
                     "and it re-noises from torch's global RNG. Timesteps (VE levels) per NFE:\n")
        for k, ts in rec["timesteps"].items():
            lines.append(f"- {k} NFE: timesteps {ts} (levels {[round(s, 4) for s in rec['levels'][k][:-1]]})")
    elif rec["scheduler"] == "LCMScheduler":
        lines.append(f"Pass {guidance} and the timesteps below "
                     "(`pipe(prompt, timesteps=[...], num_inference_steps=None, guidance_scale=1.0)`):\n")
        for k, ts in rec["timesteps"].items():
            lines.append(f"- {k} NFE: `timesteps={ts}` (levels {[round(s, 4) for s in rec['levels'][k][:-1]]})")
    else:
        lines.append(f"Pass {guidance} and the sigmas below (`pipe(prompt, sigmas=[...], guidance_scale=1.0)`):\n")
        for k, s in rec["sigmas"].items():
            lines.append(f"- {k} NFE: `sigmas={[round(v, 6) for v in s]}`")
    if pipeline == "StableDiffusion3Pipeline" and rec["exact_multistep"]:
        lines.append("\n`StableDiffusion3Pipeline` does not pass its `generator` to the scheduler: the re-noising "
                     "of multi-step stochastic sampling draws from torch's global RNG (`torch.manual_seed`).")
    if rec.get("latents_scale") is not None:
        lines.append(f"\nThe toolkit's noise `z` is the pipeline's `latents={rec['latents_scale']:.6g} * z` (the VE "
                     "start `sigma_max z` in the pipeline's coordinates).")
    if not rec["exact_multistep"]:
        lines.append(f"\nThe toolkit samples with gamma={gamma}; the pipeline's multi-step sampling is gamma=1 "
                     "(fresh noise each step), so only 1 NFE is identical.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# What a latent standalone export needs to sample without the teacher
# ---------------------------------------------------------------------------------------------------------------

def write_latent_extras(teacher: Any, folder: Path) -> dict[str, Any]:
    """Write ``folder/vae`` and, for a text teacher, ``folder/prompts.safetensors``; return the ``latent`` record of
    sampling.json."""
    from safetensors.torch import save_file

    teacher.vae.save_pretrained(folder / "vae", safe_serialization=True)
    rec: dict[str, Any] = {"vae": "vae", "scaling_factor": teacher.info.extra["vae_scaling_factor"],
                           "shift_factor": teacher.info.extra["vae_shift_factor"],
                           "pixel_shape": list(teacher.info.extra["pixel_shape"])}
    fields = getattr(teacher, "table_fields", None)
    if fields:
        table = {k: getattr(teacher, k).detach().cpu().contiguous() for k in fields}
        save_file(table, str(folder / PROMPTS_FILE), metadata={"prompts": json.dumps(teacher.prompts)})
        rec["prompts"] = PROMPTS_FILE
    return rec


def exported_eval_kwargs(path: str | Path, sampling: dict[str, Any]) -> dict[str, Any]:
    """``cond_sampler`` and ``decode`` for :func:`distill.evaluate.generate_student` on an exported latent student
    (empty for pixel exports): prompts drawn as the teacher's ``sample_cond`` draws them (uniform indices from the
    generator), the VAE's ``decode(z / scaling_factor + shift_factor)`` clamped to [-1, 1]."""
    rec = sampling.get("latent")
    if not rec:
        return {}
    from diffusers import AutoencoderKL
    from safetensors.torch import load_file

    path = Path(path)
    vae = AutoencoderKL.from_pretrained(path / rec["vae"], local_files_only=True).eval().requires_grad_(False)

    def decode(x: Tensor) -> Tensor:
        z = x.to(next(vae.parameters()).dtype) / rec["scaling_factor"] + rec["shift_factor"]
        return vae.decode(z).sample.clamp(-1.0, 1.0).to(x.dtype)

    out: dict[str, Any] = {"decode": decode}
    if rec.get("prompts"):
        table = load_file(str(path / rec["prompts"]))

        def cond_sampler(n: int, g: torch.Generator) -> Cond:
            idx = torch.randint(0, table["embeds"].shape[0], (n,), generator=g)
            return Cond(embeds=table["embeds"][idx], mask=table["mask"][idx] if "mask" in table else None,
                        pooled=table["pooled"][idx] if "pooled" in table else None,
                        added={"time_ids": table["time_ids"][idx]} if "time_ids" in table else {})

        out["cond_sampler"] = cond_sampler
    return out
