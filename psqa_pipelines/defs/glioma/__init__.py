"""Glioma domain (seed 003, GMMAS): lgg-mri + brain-mri-samples -> glioma lake (volumes, labels) -> CV folds.

Data assets live in ``assets.py`` (``glioma_cases`` + ``glioma_labels`` from one import step,
``glioma_folds``) and their checks in ``checks.py``.

TODO(issue 12, main session): the training assets (``training.py``: one ``TrainingAssetSpec`` per
GMMAS variant through ``lib/training.py``, reading ``ml.glioma.lake.export_training_dir``'s layout
and the ``glioma_folds`` table) and the prediction / evaluation / report assets (``evaluation.py``)
go beside these modules; ``dg.load_defs`` picks them up without registration.
"""
