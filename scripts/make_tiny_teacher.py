"""Write a tiny, randomly initialised diffusers pipeline folder to try the toolkit on a user-style teacher in seconds.

The folders are exactly what ``<Pipeline>.save_pretrained`` writes for a real model (``model_index.json``, ``unet/`` or
``transformer/``, ``vae/``, text encoders and tokenizers, ``scheduler/``), only a few thousand parameters each
(``tests/_tiny_models.py`` builds them; the tests use the same folders). Nothing is downloaded. Usage::

    python scripts/make_tiny_teacher.py sd my_teacher    # StableDiffusionPipeline (UNet2DConditionModel, VAE, CLIP)
    python scripts/make_tiny_teacher.py sdxl|dit|sd3 OUT # SDXL-style, DiT (class labels), SD3-style (flow)

It also writes ``OUT/prompts.txt`` (a few prompts) for the text-conditional kinds.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

KINDS = ("sd", "sdxl", "dit", "sd3")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("kind", choices=KINDS)
    ap.add_argument("out", help="the folder to write (must not exist)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    if out.exists():
        raise SystemExit(f"make_tiny_teacher: {str(out)!r} exists; give a new folder")
    import _tiny_models as tm

    builder = tm.BUILDERS[args.kind]
    with tempfile.TemporaryDirectory() as tmp:
        folder = builder(Path(tmp), seed=args.seed)
        if args.kind != "dit":
            shutil.copy(tm.write_prompts(Path(tmp)), folder / "prompts.txt")
        shutil.copytree(folder, out)
    print(f"tiny {args.kind} pipeline written to {out}")


if __name__ == "__main__":
    main()
