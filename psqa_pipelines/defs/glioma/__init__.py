"""Glioma domain (seed 003, GMMAS): lgg-mri + brain-mri-samples -> glioma lake (volumes, labels) -> CV folds
-> training directory -> GMMAS (final model + cross-validation) -> evaluation, ablation, missing-modality
study, reports -> champion/challenger.

* ``assets.py``: ``glioma_cases`` + ``glioma_labels`` (one import step), ``glioma_folds``;
* ``training.py``: ``glioma_training_data`` (the shared training layout), ``glioma_model`` (a
  ``TrainingAssetSpec`` through ``lib/training.py``; registered ``glioma-gmmas``) and
  ``glioma_cv_predictions`` (``ml.glioma.cv.run_cv``, one MLflow child run per fold);
* ``evaluation.py``: ``glioma_evaluation`` (vs majority and radiomics baselines), ``glioma_ablation``,
  ``glioma_missing_modality``, ``glioma_reports``, ``glioma_challenger_eval`` -> ``glioma_champion``;
* ``checks.py``: label table, folds, and the blocking ``glioma_challenger_beats_champion``;
* ``jobs.py`` / ``schedules.py``: ``glioma_job`` (the whole group) and the weekly ``glioma_schedule``.

``dg.load_defs`` picks the modules up without registration.
"""
