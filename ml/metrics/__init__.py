"""Metrics (gamma index, dose/segmentation/regression metrics). Pure numpy/torch."""
