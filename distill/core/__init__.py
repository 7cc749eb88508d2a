"""The foundation every other package may import: coordinate and prediction conversions, noise grids, the
registries and config errors, NFE counting, the teacher ODE/SDE solvers, data loading, EMA policies and the
preconditioning scalings shared by teachers and students.

Layering (docs/design.md §1): ``distill.core`` imports nothing else of the project; then ``teachers`` ->
``students`` -> ``losses`` -> the rest of ``distill`` (training, evaluation, export, CLI). ``python
../shared/tools/check_layers.py`` walks every import, function-local ones included.
"""
