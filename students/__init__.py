"""Students: flow maps ``J(x, sigma_from, sigma_to, cond)`` of three kinds (generator, consistency, flow map),
built from a teacher (``build_student``) or from a saved config (``build_student_from_config``), and the one student
sampler ``sample_student`` (deterministic jumps, CTM gamma-sampling, multistep consistency sampling)."""

from .base import FlowMapStudent
from .nets import MLPDenoiser, sinusoidal_embedding
from .sampling import sample_student
from .students import (
    MLP_KEYS,
    STUDENTS,
    ConsistencyStudent,
    FlowMapNetStudent,
    GeneratorStudent,
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
    "MLPDenoiser",
    "sinusoidal_embedding",
    "STUDENTS",
    "MLP_KEYS",
    "build_student",
    "build_student_from_config",
    "sample_student",
    "cm_scalings",
    "edm_scalings",
]
