"""psqa ml core: models, losses, metrics, data readers, trainers and a CLI.

This package must stay importable on a GPU node that has only torch, numpy, pandas and
pyarrow: it never imports dagster or mlflow, and modules that need pydicom, nibabel or
SimpleITK import them lazily (inside functions) or live in submodules that the GPU-side
commands never touch.
"""

__version__ = "0.1.0"
