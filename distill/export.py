"""``distill export``: a distilled student as a folder that stands alone (docs/design.md §5).

The folder holds

* ``model.safetensors`` — the EMA student's weights (no pickles);
* ``student_config.json`` — the constructor config ``students.build_student_from_config`` rebuilds it from;
* ``sampling.json`` — the noise levels per NFE and the gamma it was evaluated with, so nobody passes a timestep list
  by hand;
* ``fid.json`` — the FID records (with protocol) of the run, when it has them;
* ``README.md`` — a model card;
* ``diffusers/`` — for a pixel consistency student of an EDM teacher, a folder that diffusers'
  ``ConsistencyModelPipeline`` loads (``unet/`` + ``scheduler/`` with ``CMStochasticIterativeScheduler``; a LoRA
  student's adapters merged in);
* ``diffusers/`` — for a generator or consistency student of a latent teacher (SD, SDXL, DiT, SD3 folders), the
  teacher's pipeline folder with the student's network and a scheduler that reproduces the toolkit's sampler
  (:mod:`distill.export_pipelines`; ``sampling.json``'s ``pipeline`` record has the timesteps/sigmas per NFE);
* ``vae/`` and ``prompts.safetensors`` — for a latent teacher's student, what ``distill sample/eval --student``
  need to decode and to draw the teacher's prompts without the teacher;
* ``lora/`` — for a LoRA student (``students.lora``), the adapter alone (:func:`export_lora_adapter`): a peft
  adapter folder (``adapter_model.safetensors`` + ``adapter_config.json``) that ``peft.PeftModel.from_pretrained`` or
  :func:`students.lora.load_adapter` put on the teacher's network, and for a ``UNet2DConditionModel`` the
  ``pytorch_lora_weights.safetensors`` that ``StableDiffusionPipeline.load_lora_weights`` reads.

A LoRA student's checkpoint holds only its adapters: the export rebuilds the frozen base from the run's teacher
(``teacher`` section of the run config, a local folder). ``merge=True`` (``distill export --merge``) writes the
standalone student with the adapters merged into full weights (a plain student config); by default the standalone
student keeps the adapter structure (``student_config.json`` names the ``lora`` spec).

It is written to a temporary folder first and moved into place, so an interrupted export leaves nothing half-written.
:func:`load_exported` reads it back; ``distill sample`` and ``distill eval`` use it without the teacher.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from distill.core.registry import ConfigError
from distill.train import load_training_checkpoint
from students import SamplingPlan, build_student_from_config
from students.lora import adapter_state_dict, merged_copy, save_adapter

__all__ = ["export_checkpoint", "load_exported", "warm_start_student", "find_checkpoint", "export_plan",
           "export_lora_adapter", "merged_student", "SD_LORA_WEIGHTS"]

#: the file ``StableDiffusionPipeline.save_lora_weights`` writes and ``load_lora_weights`` reads
SD_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def export_plan(sampling: dict[str, Any]) -> SamplingPlan:
    """The sampling plan of an export's ``sampling.json``: its levels per NFE (without the final 0) and gamma."""
    levels = {int(k): tuple(v[:-1]) for k, v in sampling["sigmas"].items()}
    return SamplingPlan(gamma=float(sampling["gamma"]), levels=levels)


def find_checkpoint(path: str | Path) -> Path:
    """A run directory (``checkpoints/last.ckpt`` inside) or a checkpoint file."""
    path = Path(path)
    if path.is_dir():
        cand = path / "checkpoints" / "last.ckpt"
        if not cand.is_file():
            raise FileNotFoundError(f"run directory {str(path)!r} has no checkpoints/last.ckpt")
        return cand
    if not path.exists():
        raise FileNotFoundError(f"checkpoint or run directory {str(path)!r} does not exist")
    return path


def _ema_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    prefix = "ema.module."
    out = {k[len(prefix):]: v.contiguous() for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        raise ValueError("checkpoint has no EMA student weights (ema.module.*)")
    return out


def _student_with_weights(meta: dict[str, Any], weights: dict[str, torch.Tensor]) -> Any:
    """The run's student with the checkpoint's EMA weights. A LoRA student's checkpoint lacks the frozen base: it is
    rebuilt from the run's teacher exactly as training built it (``build_student`` on the ``student`` section)."""
    student = build_student_from_config(meta["student_config"])
    missing = sorted(set(student.state_dict()) - set(weights))
    if missing and meta["student_config"].get("lora") is not None:
        from students import build_student
        from teachers import build_teacher

        cfg = meta["config"]
        try:
            teacher = build_teacher(dict(cfg["teacher"]))
        except Exception as exc:
            raise ValueError(f"this LoRA checkpoint holds adapters only; rebuilding the frozen base needs the run's "
                             f"teacher {cfg.get('teacher')}, which failed: {str(exc).splitlines()[0]}") from None
        spec = {k: v for k, v in dict(cfg["student"]).items() if k != "name"}
        student = build_student(meta["student_config"]["kind"], teacher, **spec).cpu()
        if student.config() != meta["student_config"]:
            raise ValueError("the student rebuilt from the run's teacher does not match the checkpoint's student "
                             "config (was the teacher folder changed?)")
        missing = sorted(set(student.state_dict()) - set(weights) - set(student.rebuilt_state_keys))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} EMA student weight(s) (e.g. ema.module.{missing[0]})")
    student.load_state_dict(weights, strict=False)
    return student.eval()


def merged_student(student: Any) -> Any:
    """A plain (adapter-free) student whose network is ``student``'s with the LoRA adapters merged into the base
    weights (:func:`students.lora.merged_copy`); it computes what the adapted student computes."""
    cfg = {k: v for k, v in student.config().items() if k != "lora"}
    plain = build_student_from_config(cfg)
    net = merged_copy(student.lora_net())
    target = plain.lora_net()
    target.load_state_dict(net.state_dict(), strict=True)
    rest = {k: v for k, v in student.state_dict().items() if not k.startswith(student.lora_prefix())}
    missing, unexpected = plain.load_state_dict(rest, strict=False)
    if unexpected or any(not k.startswith(plain.lora_prefix()) for k in missing):
        raise RuntimeError(f"merged student does not fit its plain config: {unexpected[:3]} {missing[:3]}")
    return plain.eval()


def export_lora_adapter(net: Any, folder: Path) -> str:
    """Write the LoRA adapter of a student's network ``net`` (``student.lora_net()``) to ``folder`` and return the
    model-card paragraph on loading it.

    Always a peft adapter folder (:func:`students.lora.save_adapter`). For a ``UNet2DConditionModel`` also
    ``pytorch_lora_weights.safetensors`` from ``StableDiffusionPipeline.save_lora_weights`` (peft-format keys under
    ``unet.``, the adapter config in the metadata), which ``StableDiffusionPipeline.load_lora_weights(folder)`` reads.
    """
    save_adapter(net, folder)
    name = type(net).__name__
    if name == "UNet2DConditionModel":
        from diffusers import StableDiffusionPipeline

        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=adapter_state_dict(net),
                                                  unet_lora_adapter_metadata=net.peft_config["default"].to_dict(),
                                                  weight_name=SD_LORA_WEIGHTS)
        return ("`lora/` is the adapter alone. In the teacher's pipeline:\n\n```python\n"
                "pipe.load_lora_weights('<this folder>/lora')\n```\n\nor, on the bare network, "
                "`peft.PeftModel.from_pretrained(unet, '<this folder>/lora')`.\n")
    return (f"`lora/` is the adapter alone, as a peft adapter folder for the teacher's `{name}` (diffusers has no "
            f"LoRA loader for this model class):\n\n```python\nfrom peft import PeftModel\n"
            f"net = PeftModel.from_pretrained(teacher_net, '<this folder>/lora')\n```\n\nor "
            f"`students.lora.load_adapter(teacher_net, '<this folder>/lora')`.\n")


def export_checkpoint(path: str | Path, out: str | Path, nfes: list[int] | None = None,
                      overwrite: bool = False, merge: bool = False) -> Path:
    """Export the EMA student of a run directory or checkpoint to the folder ``out`` (``merge``: a LoRA student's
    standalone weights with the adapters merged in)."""
    ckpt_path = find_checkpoint(path)
    ckpt = load_training_checkpoint(ckpt_path)
    meta = ckpt["distill"]
    cfg = meta["config"]
    student = _student_with_weights(meta, _ema_state(ckpt["state_dict"]))
    lora = getattr(student, "lora", None) is not None
    merged = merged_student(student) if lora else student
    if merge and not lora:
        raise ValueError("--merge needs a LoRA student (student.lora in the run config); this one has full weights")
    standalone = merged if merge else student
    ev = cfg.get("eval", {})
    nfes = nfes or list(ev.get("nfe", [1, 2, 4]))
    # The run's one sampling plan (the same object its evaluation and sample grids used).
    plan = SamplingPlan.from_dict(meta.get("sampling", {}))
    sampling = {
        "sampler": "students.sample_student",
        "plan": plan.to_dict(),
        "gamma": plan.gamma,
        "sigmas": {str(k): plan.sigmas(k, student.sigma_max).tolist() for k in nfes},
        "default_nfe": int(nfes[0]),
        "data_shape": list(student.data_shape),
        "num_classes": meta.get("teacher_info", {}).get("num_classes"),
    }
    out = Path(out)
    if out.exists() and not overwrite:
        raise FileExistsError(f"export folder {str(out)!r} already exists (pass --overwrite to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in standalone.state_dict().items()}, tmp / "model.safetensors")
        (tmp / "student_config.json").write_text(json.dumps(standalone.config(), indent=2))
        run_dir = ckpt_path.parent.parent
        records: dict[str, Any] = {}
        for name in ("eval.json", "fid_vs_step.json"):
            f = run_dir / name
            if f.is_file():
                records[name.removesuffix(".json")] = json.loads(f.read_text())
        (tmp / "fid.json").write_text(json.dumps(records, indent=1))
        (tmp / "training_config.json").write_text(json.dumps(cfg, indent=2))
        latent = bool(meta.get("teacher_info", {}).get("extra", {}).get("latent"))
        try:
            if latent:
                from distill.export_pipelines import export_latent_pipeline

                diffusers_note, sampling["pipeline"] = export_latent_pipeline(merged, tmp / "diffusers", sampling,
                                                                              cfg)
            else:
                diffusers_note = export_consistency_pipeline(merged, tmp / "diffusers", sampling)
        except NotImplementedError as exc:
            diffusers_note = f"No diffusers pipeline folder was written: {exc}."
            print(f"distill export: no diffusers/ pipeline folder: {exc}")
        if latent:
            from distill.export_pipelines import write_latent_extras
            from teachers import build_teacher

            sampling["latent"] = write_latent_extras(build_teacher(dict(cfg["teacher"])), tmp)
        (tmp / "sampling.json").write_text(json.dumps(sampling, indent=2))
        if lora:
            diffusers_note += "\n" + export_lora_adapter(student.lora_net(), tmp / "lora")
            diffusers_note += (f"\nLoRA: {json.dumps(student.lora)}; the standalone weights here are "
                               f"{'merged (full weights, no adapters)' if merge else 'base + adapters'}.\n")
        (tmp / "README.md").write_text(model_card(cfg, meta, sampling, run_dir, diffusers_note))
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_consistency_pipeline(student: Any, folder: Path, sampling: dict[str, Any]) -> str:
    """Write a folder diffusers' ``ConsistencyModelPipeline`` loads, for a consistency student whose backbone is a
    ``UNet2DModel`` under EDM F-prediction preconditioning with UNet timestep ``1000 c_noise = 250 log sigma`` (an EDM
    teacher's copy with ``edm_timestep_scale = 250``): then the student's ``c_in``, network timestep and boundary
    ``c_skip/c_out`` are exactly ``CMStochasticIterativeScheduler``'s.

    Returns the model-card paragraph that says how to sample it. Raises ``NotImplementedError`` (with the reason) for
    students that pipeline cannot express.
    """
    # diffusers is imported here only: it takes seconds to import and only this export path needs it.
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline

    if getattr(student, "kind", None) != "consistency":
        raise NotImplementedError(f"diffusers has no pipeline for a {getattr(student, 'kind', '?')} student; load it "
                                  "with distill.export.load_exported")
    cfg = student.config()
    bb, pre = cfg["backbone"], cfg.get("precond", {})
    if student.takes_guidance:
        raise NotImplementedError("ConsistencyModelPipeline has no guidance-scale input; a guidance-conditioned "
                                  "student loads with distill.export.load_exported")
    if bb.get("type") != "unet" or bb.get("model", "UNet2DModel") != "UNet2DModel" \
            or float(bb.get("timestep_scale", 0)) != 1000.0 \
            or (pre.get("family"), pre.get("prediction_type")) != ("edm", "epsilon"):
        raise NotImplementedError("ConsistencyModelPipeline needs a UNet consistency student of an EDM teacher "
                                  "with edm_timestep_scale=250 and epsilon (F) prediction")
    num_train_timesteps = 1000  # the Karras discretisation the pipeline's integer timesteps index
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=num_train_timesteps, sigma_min=student.sigma_min,
                                               sigma_max=student.sigma_max, sigma_data=student.sigma_data, rho=7.0,
                                               clip_denoised=False)
    pipe = ConsistencyModelPipeline(unet=student.net.unet, scheduler=scheduler)
    pipe.save_pretrained(folder, safe_serialization=True)
    # The pipeline's timestep i means Karras level i of num_train_timesteps: map our levels to the nearest ones.
    ramp = np.linspace(0, 1, num_train_timesteps)
    karras = (student.sigma_max ** (1 / 7) + ramp * (student.sigma_min ** (1 / 7) - student.sigma_max ** (1 / 7))) ** 7
    lines = []
    for k, levels in sampling["sigmas"].items():
        idx = [int(np.abs(karras - s).argmin()) for s in levels[:-1]]
        got = [round(float(karras[i]), 4) for i in idx]
        lines.append(f"- {k} NFE: `pipe(timesteps={idx}, num_inference_steps=None)` (levels {got})")
    return ("`diffusers/` loads in diffusers' `ConsistencyModelPipeline` (`unet/` + `scheduler/` with "
            "`CMStochasticIterativeScheduler`, `clip_denoised=False`):\n\n"
            "```python\nfrom diffusers import ConsistencyModelPipeline\n"
            "pipe = ConsistencyModelPipeline.from_pretrained('<this folder>/diffusers')\n```\n\n"
            "For 1-channel images pass `generator=` rather than `latents=` (diffusers checks latents for 3 "
            "channels). One step is identical to `distill sample --nfe 1` (a test checks it); for several "
            "steps pass the timesteps below (diffusers re-noises to `sqrt(sigma^2 - sigma_min^2)`, ours to "
            "`sigma`):\n\n"
            + "\n".join(lines) + "\n")


def model_card(cfg: dict[str, Any], meta: dict[str, Any], sampling: dict[str, Any], run_dir: Path,
               diffusers_note: str) -> str:
    summary = run_dir / "eval.md"
    table = summary.read_text() if summary.is_file() else "(no final evaluation was recorded for this run)\n"
    sigmas = "\n".join(f"- {k} NFE: `{[round(s, 5) for s in v]}`" for k, v in sampling["sigmas"].items())
    return f"""# Distilled student: {cfg.get('name', 'run')}

- teacher: `{json.dumps(cfg.get('teacher'))}`
- student: `{meta['student_config'].get('kind', '?')}` ({json.dumps(cfg.get('student'))})
- loss: `{json.dumps(cfg.get('loss'))}`
- trained for {meta.get('iteration')} iterations; weights are the EMA ({cfg.get('ema')})

## Sampling

`students.sample_student(student, noise, sigmas, gamma={sampling['gamma']})` with standard-normal noise and these
noise levels (VE/EDM sigma; the final 0 is the jump to data):

{sigmas}

Load and sample without the teacher:

```python
from distill.export import load_exported
student, sampling = load_exported("{'{this folder}'}")
```

or `distill sample --student <this folder> --nfe 1`.

{diffusers_note}

## Evaluation

{table}
"""


def load_exported(path: str | Path, map_location: str = "cpu") -> tuple[Any, dict[str, Any]]:
    """Rebuild an exported student (weights loaded, eval mode) and its sampling settings."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"exported student folder {str(path)!r} does not exist")
    for name in ("model.safetensors", "student_config.json", "sampling.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"exported student folder {str(path)!r} has no {name}")
    student = build_student_from_config(json.loads((path / "student_config.json").read_text()))
    student.load_state_dict(_export_weights(path, map_location), strict=True)
    student.eval().requires_grad_(False)
    return student, json.loads((path / "sampling.json").read_text())


def _export_weights(path: Path, map_location: str = "cpu") -> dict[str, torch.Tensor]:
    """An export folder's ``model.safetensors`` (a one-line ``ValueError`` if it is corrupt or truncated)."""
    try:
        return load_file(path / "model.safetensors", device=map_location)
    except Exception as exc:
        raise ValueError(f"{str(path / 'model.safetensors')!r} is corrupt or truncated ({exc})") from None


def warm_start_student(student: Any, path: str | Path) -> None:
    """Load an exported student's weights into a freshly built ``student`` (config ``student.from_export``: fine-tune
    a distilled student, e.g. a trajectory student under a distribution-matching term). The export must hold the
    same student kind with the same parameter names and shapes; anything else fails with one line."""
    path = Path(path)
    for name in ("model.safetensors", "student_config.json"):
        if not (path / name).is_file():
            raise FileNotFoundError(f"student.from_export: {str(path)!r} is not an exported student folder (no {name}; "
                                    "write one with `distill export RUN --out FOLDER`)")
    kind = json.loads((path / "student_config.json").read_text()).get("kind")
    if kind != getattr(student, "kind", kind):
        raise ConfigError(f"student.from_export: {str(path)!r} holds a {kind!r} student, the config builds a "
                          f"{student.kind!r} one")
    weights = _export_weights(path)
    own = student.state_dict()
    missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    shapes = [k for k in set(own) & set(weights) if tuple(own[k].shape) != tuple(weights[k].shape)]
    if missing or extra or shapes:
        raise ConfigError(f"student.from_export: {str(path)!r} does not fit the configured student (missing "
                          f"{missing[:3]}, unexpected {extra[:3]}, shape mismatches {sorted(shapes)[:3]})")
    student.load_state_dict({k: v.to(own[k]) for k, v in weights.items()}, strict=True)
