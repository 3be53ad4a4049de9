"""MLflow pyfunc wrapper around a torch ``state_dict`` (the project's explicit model format).

Why not ``mlflow.pytorch`` directly: MLflow 3.17 defaults to the ``pt2`` export, which needs an
``input_example``, reloads as a traced graph and breaks dict-input multi-task models; the
pickle format ties the artifact to the exact class layout and torch version. Here the
artifact is ``state_dict.pt`` + ``model_config.json`` (importable class path and constructor
kwargs); loading rebuilds the ``nn.Module`` and calls it with a dict of tensors, so the same
model runs on torch 2.11 (GPU node) and 2.13 (here). ``code_paths`` ships the ``ml`` package
and this module with the model, so ``mlflow.pyfunc.load_model`` works without the repo.
"""

import importlib
import json

import mlflow.pyfunc


def build_module(config: dict):
    module_name, _, cls_name = config["class_path"].partition(":")
    cls = getattr(importlib.import_module(module_name), cls_name)
    return cls(**config.get("kwargs", {}))


class TorchStateDictModel(mlflow.pyfunc.PythonModel):
    # inputs are dicts of arrays of model-specific shapes: no type hints on ``predict`` on purpose.
    # Without this flag MLflow warns at every import of this class that they are missing (its
    # own ``simplefilter("once")`` overrides any warnings filter); the flag is MLflow's switch
    # that skips type-hint validation for a PythonModel subclass (as its ChatModel uses).
    _skip_type_hint_validation = True

    def load_context(self, context) -> None:
        import torch

        with open(context.artifacts["model_config"]) as f:
            self.config = json.load(f)
        self.model = build_module(self.config)
        state = torch.load(context.artifacts["state_dict"], map_location="cpu", weights_only=True)
        self.model.load_state_dict(state)
        self.model.eval()

    def predict(self, context, model_input, params=None):
        import numpy as np
        import torch

        names = self.config.get("input_names") or []
        if isinstance(model_input, dict):
            inputs = {k: torch.as_tensor(np.asarray(v)) for k, v in model_input.items()}
        else:
            arr = np.asarray(model_input)
            inputs = {names[0] if names else "x": torch.as_tensor(arr)}
        with torch.inference_mode():
            out = self.model(**inputs) if len(inputs) > 1 or names else self.model(next(iter(inputs.values())))
        if isinstance(out, dict):
            return {k: v.detach().cpu().numpy() for k, v in out.items()}
        if isinstance(out, (tuple, list)):
            return {f"output_{i}": v.detach().cpu().numpy() for i, v in enumerate(out)}
        return out.detach().cpu().numpy()
