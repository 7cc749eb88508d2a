"""Small builders for the loss contract's typed arguments (``losses.base.StepContext`` and ``Batch``) in tests."""

from __future__ import annotations

import torch
from torch import nn

from losses.base import Batch, StepContext
from students import FlowMapStudent


def ctx(k: int = 0, total: int = 100, device: str = "cpu", dtype: torch.dtype = torch.float32) -> StepContext:
    return StepContext(k, total, torch.device(device), dtype)


def batch(data: torch.Tensor | None = None, labels: torch.Tensor | None = None, size: int | None = None,
          k: int = 0, seed: int = 0, extras: dict | None = None, dtype: torch.dtype | None = None) -> Batch:
    """A one-process batch; its size and dtype follow ``data`` when given."""
    size = size if size is not None else int(data.shape[0])
    dtype = dtype or (data.dtype if data is not None else torch.float32)
    return Batch(size, data, labels, extras, seed=seed, iteration=k, dtype=dtype)


def fit(step, params, steps: int, lr: float) -> None:
    """Adam with a cosine-annealed lr for ``steps`` steps on ``step(i) -> scalar loss`` (the closed-form convergence
    tests of the distribution-matching losses)."""
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for i in range(steps):
        opt.zero_grad()
        step(i).backward()
        opt.step()
        sched.step()


# ---------------------------------------------------------------------------------------------------------------
# Gaussian -> Gaussian closed forms shared by the distribution-matching loss tests (docs/methods.md §4.2)
# ---------------------------------------------------------------------------------------------------------------


def gaussian_denoiser(x: torch.Tensor, sigma: torch.Tensor | float, m, s) -> torch.Tensor:
    """Closed form ``D*(x, sigma) = (s^2 x + sigma^2 m) / (s^2 + sigma^2)`` of ``N(m, s^2)`` (``sigma`` scalar or
    ``[B]``, broadcast over ``x: [B, ...]``)."""
    sig2 = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, *([1] * (x.ndim - 1))) ** 2
    return (s**2 * x + sig2 * m) / (s**2 + sig2)


class GaussianGenerator(FlowMapStudent):
    """One-step generator ``x = b + a z`` in the student contract: ``J(sigma_max z, sigma_max, 0) = b + a z``
    (float64 parameters). With a list ``b`` and labels, ``b`` is per class: ``x = b[c] + a z``."""

    kind = "generator"

    def __init__(self, a: float, b: float | list[float], sigma_max: float = 80.0) -> None:
        super().__init__((1,), 0.002, sigma_max, 0.5)
        self.a = nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.b = nn.Parameter(torch.tensor(b, dtype=torch.float64))

    def x0_estimate(self, x, sigma_from, sigma_to, cond=None):
        b = self.b if cond is None else self.b[cond][:, None]
        return b + self.a * x / sigma_from.reshape(-1, 1)


class ExactGaussianFake(nn.Module):
    """The exact fake denoiser of a :class:`GaussianGenerator`'s *current* ``N(b[c], a^2)``, its parameters held
    fixed (stop-gradient: SiD's ``sg(psi)``, SIM's ``sg[theta]``)."""

    def __init__(self, gen: GaussianGenerator) -> None:
        super().__init__()
        self.__dict__["gen"] = gen  # a reference, not a submodule: the fake must not own the generator's parameters

    def denoise(self, x, sigma, cond=None):
        a, b = self.gen.a.detach().abs(), self.gen.b.detach()
        return gaussian_denoiser(x, sigma, b if cond is None else b[cond][:, None], a)


def assert_resume_exact(make_cfg, steps: int, split: int | None = None, tag: str = "") -> dict:
    """Train ``steps`` iterations straight, and ``split`` (default ``steps // 2``) + resume + the rest in another run
    (``make_cfg(name, steps)`` -> a config whose ``out_dir`` ends in ``name``); assert the two final checkpoints are
    equal bit for bit: every state-dict tensor and every optimizer state. Returns the straight run's checkpoint."""
    from pathlib import Path

    from distill.train import run_training

    run_training(make_cfg("straight", steps), final_eval=False)
    run_training(make_cfg("split", split if split is not None else steps // 2), final_eval=False)
    run_training(make_cfg("split", steps), resume=True, final_eval=False)
    a, b = (torch.load(Path(make_cfg(name, steps).out_dir) / "checkpoints" / "last.ckpt", weights_only=True)
            for name in ("straight", "split"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), f"{tag}: {k} differs after resume"
    for oa, ob in zip(a["optimizer_states"], b["optimizer_states"], strict=True):
        for i, st in oa["state"].items():
            for key, v in st.items():
                assert torch.equal(torch.as_tensor(v), torch.as_tensor(ob["state"][i][key])), (tag, i, key)
    return a
