"""Data readers, de-identification, ingestion and preprocessing (no dagster, no mlflow)."""
