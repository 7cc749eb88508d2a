"""distill: a toolkit for distilling diffusion and flow teachers into 1-8 step students.

The system package: shared math (noise grids, coordinate and prediction conversions), samplers,
metrics, registries and config loading, the Lightning module, callbacks, checkpoints, export and the CLI.
"""

__version__ = "0.1.0"
