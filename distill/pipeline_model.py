"""Diffusers model classes whose output is what a pipeline's scheduler needs, for students whose parameterisation the
stock scheduler cannot express (``distill export`` copies this file, unchanged, into the exported network folder).

This file imports only ``torch`` and ``diffusers``: ``distill export`` writes it next to the network's
``config.json`` and names it in ``model_index.json``, so that diffusers' custom-component loader finds it
(``Pipeline.from_pretrained(folder, trust_remote_code=True)``) without the toolkit installed.

Why: a consistency student of a VP teacher is ``f(x, s) = c(s) x + (1 - c(s)) D(x, s)`` (Song et al. 2023,
arXiv:2303.01469, App. C, with ``c = sd^2 / ((s - eps)^2 + sd^2)`` in VE units); ``LCMScheduler`` applies its own
boundary scalings (``get_scalings_for_boundary_condition_discrete``: ``sigma_data = 0.5`` and ``timestep *
timestep_scaling``) in VP units, which cannot equal ours at every level. So the exported network returns the epsilon
whose scheduler-side ``x0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)`` is exactly the student's ``f``, and the
exported ``LCMScheduler`` has ``timestep_scaling`` so large that its boundary scalings are the identity (``c_skip``
below 1e-30, ``c_out`` 1 to float32 precision).

* :class:`EpsilonUNet2DConditionModel` / :class:`EpsilonDiTTransformer2DModel` (VP): ``eps = a[t] x_t + b[t] F``
  with ``F`` the network's own output and per-integer-timestep tables ``a, b`` (buffers ``distill_eps_x``,
  ``distill_eps_out``, ``[TABLE_SIZE]`` float64, saved with the weights);
* :class:`VelocitySD3Transformer2DModel` (rectified flow, ``x_t = (1 - t) x0 + t eps``): the velocity ``v`` whose
  Euler jump to 0, ``x_t - t v``, is the consistency function: ``v = (1 - c) F - c x_t / (1 - t)`` (buffer
  ``distill_boundary = [sigma_data, eps, num_train_timesteps]``).

For DiT the learned-variance channels past ``in_channels`` are passed through unchanged (the pipeline drops them).
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

#: entries of the per-timestep tables (the VP schedulers' ``num_train_timesteps``)
TABLE_SIZE = 1000

__all__ = ["EpsilonUNet2DConditionModel", "EpsilonDiTTransformer2DModel", "VelocitySD3Transformer2DModel",
           "TABLE_SIZE"]


def _mix(out, sample, timestep, a_table, b_table, return_dict):
    """``a[t] sample + b[t] raw`` on the first ``sample.shape[1]`` channels of the model output ``out``."""
    raw = out.sample if return_dict else out[0]
    c = sample.shape[1]
    t = torch.as_tensor(timestep, device=sample.device).reshape(-1).round().long().clamp(0, TABLE_SIZE - 1)
    t = t.expand(sample.shape[0]) if t.numel() == 1 else t
    shape = (-1,) + (1,) * (sample.ndim - 1)
    a = a_table[t].reshape(shape).to(raw.dtype)
    b = b_table[t].reshape(shape).to(raw.dtype)
    new = torch.cat([a * sample.to(raw.dtype) + b * raw[:, :c], raw[:, c:]], dim=1)
    if return_dict:
        out.sample = new
        return out
    return (new,) + tuple(out[1:])


class EpsilonUNet2DConditionModel(UNet2DConditionModel):
    """A ``UNet2DConditionModel`` returning ``a[t] x_t + b[t] F(x_t, t)`` (module docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("distill_eps_x", torch.zeros(TABLE_SIZE, dtype=torch.float64))
        self.register_buffer("distill_eps_out", torch.ones(TABLE_SIZE, dtype=torch.float64))

    @staticmethod
    def _get_init_keys(input_class):  # the config is the plain UNet's
        return UNet2DConditionModel._get_init_keys(UNet2DConditionModel)

    def forward(self, sample, timestep, *args, return_dict: bool = True, **kwargs):
        out = super().forward(sample, timestep, *args, return_dict=return_dict, **kwargs)
        return _mix(out, sample, timestep, self.distill_eps_x, self.distill_eps_out, return_dict)


class EpsilonDiTTransformer2DModel(DiTTransformer2DModel):
    """A ``DiTTransformer2DModel`` returning ``a[t] x_t + b[t] F(x_t, t)`` on its first ``in_channels`` outputs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("distill_eps_x", torch.zeros(TABLE_SIZE, dtype=torch.float64))
        self.register_buffer("distill_eps_out", torch.ones(TABLE_SIZE, dtype=torch.float64))

    @staticmethod
    def _get_init_keys(input_class):
        return DiTTransformer2DModel._get_init_keys(DiTTransformer2DModel)

    def forward(self, hidden_states, timestep=None, *args, return_dict: bool = True, **kwargs):
        out = super().forward(hidden_states, timestep, *args, return_dict=return_dict, **kwargs)
        return _mix(out, hidden_states, timestep, self.distill_eps_x, self.distill_eps_out, return_dict)


class VelocitySD3Transformer2DModel(SD3Transformer2DModel):
    """An ``SD3Transformer2DModel`` returning the velocity of a flow-family consistency function (module docstring):
    with ``t = timestep / num_train_timesteps`` and ``sigma = t / (1 - t)``,
    ``c = sd^2 (1 - t)^2 / ((t - eps (1 - t))^2 + sd^2 (1 - t)^2)`` (``= sd^2 / ((sigma - eps)^2 + sd^2)``) and
    ``v = (1 - c) F - c x_t / (1 - t)``, written so that ``t = 1`` is finite."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.register_buffer("distill_boundary", torch.tensor([1.0, 0.0, 1000.0], dtype=torch.float64))

    @staticmethod
    def _get_init_keys(input_class):
        return SD3Transformer2DModel._get_init_keys(SD3Transformer2DModel)

    def forward(self, hidden_states, *args, timestep=None, return_dict: bool = True, **kwargs):
        out = super().forward(hidden_states, *args, timestep=timestep, return_dict=return_dict, **kwargs)
        raw = out.sample if return_dict else out[0]
        sd, eps, n = (float(v) for v in self.distill_boundary)
        t = torch.as_tensor(timestep, device=raw.device, dtype=torch.float64).reshape(-1) / n
        t = t.expand(raw.shape[0]) if t.numel() == 1 else t
        one = 1 - t
        den = (t - eps * one) ** 2 + sd**2 * one**2
        c = sd**2 * one**2 / den
        c_over = sd**2 * one / den  # c / (1 - t)
        shape = (-1,) + (1,) * (raw.ndim - 1)
        new = ((1 - c).reshape(shape).to(raw.dtype) * raw
               - c_over.reshape(shape).to(raw.dtype) * hidden_states.to(raw.dtype))
        if return_dict:
            out.sample = new
            return out
        return (new,) + tuple(out[1:])
