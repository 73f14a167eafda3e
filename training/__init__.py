"""Training, dataset building and evaluation for DeepSalReg (depends on ``DeepSalRegLib``, never the reverse).

Modules (one concept each):

* ``synthetic``: random smooth deformations with known fields, synthetic outliers, synthetic images.
* ``flow_io``: Middlebury ``.flo`` files (the thesis's 2D flow format) <-> library fields.
* ``datasets``: the HDF5 dataset format, pair sampling, augmentation, resumable samplers.
* ``config``: training configuration (YAML/JSON) with validated command-line overrides.
* ``checkpoints``: resumable training-state checkpoints (model, optimiser, scheduler, RNG, data position).
* ``make_dataset`` / ``train`` / ``evaluate``: the three commands (``python training/<name>.py --help``).
"""
