"""Students: flow maps ``J(x, sigma_from, sigma_to, cond)`` = parameterisation (:mod:`students.precond`) x raw
backbone (:mod:`students.backbones`), of four kinds (generator, consistency, trigflow, flow map), built from a
teacher (``build_student``) or from a saved config (``build_student_from_config``), and the one student sampler
``sample_student`` (deterministic jumps, CTM gamma-sampling, multistep consistency sampling)."""

from .backbones import Backbone, UNetBackbone
from .base import FlowMapStudent
from .nets import GUIDANCE_KEYS, GuidanceEmbedding, MLPDenoiser, sinusoidal_embedding
from .precond import ConsistencyPrecond, DenoiserPrecond
from .sampling import SamplingPlan, sample_student
from .students import (
    MLP_KEYS,
    STUDENTS,
    ConsistencyStudent,
    FlowMapNetStudent,
    GeneratorStudent,
    TrigFlowStudent,
    build_student,
    build_student_from_config,
    cm_scalings,
    edm_scalings,
)

__all__ = [
    "FlowMapStudent",
    "GeneratorStudent",
    "ConsistencyStudent",
    "FlowMapNetStudent",
    "TrigFlowStudent",
    "Backbone",
    "MLPDenoiser",
    "GuidanceEmbedding",
    "GUIDANCE_KEYS",
    "UNetBackbone",
    "DenoiserPrecond",
    "ConsistencyPrecond",
    "sinusoidal_embedding",
    "STUDENTS",
    "MLP_KEYS",
    "build_student",
    "build_student_from_config",
    "sample_student",
    "SamplingPlan",
    "cm_scalings",
    "edm_scalings",
]
