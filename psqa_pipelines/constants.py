"""Names shared across the Dagster layer (groups read as the data flow in the UI)."""

INGEST = "ingest"
PREPROCESS = "preprocess"
LAKE = "lake_tables"
PSQA = "psqa"
PSQA_TRAINING = "psqa_training"

OWNER_DATA = "team:data-engineering"
OWNER_ML = "team:ml"
OWNER_PHYSICS = "team:medical-physics"

STUDIES_PARTITION = "studies"
PLANS_PARTITION = "plans"  # the studies that carry an RT Plan (plan-QA assets)
#: run tag of an ingestion run: the number of files of its study (the sensor sets it; the UI shows
#: it; the demo's parallel runner starts the biggest studies first)
STUDY_FILES_TAG = "psqa/files"

PSQA_MODEL_NAME = "psqa-bmmqa"  # the registered MLflow model of the BMMQA variant
CHAMPION_ALIAS = "champion"

CONTOUR_DOSE = "contour_dose"
CONTOUR_DOSE_TRAINING = "contour_dose_training"
CONTOUR_DOSE_MODEL_PREFIX = "contour-dose-"  # registered MLflow models: contour-dose-<variant>

GLIOMA = "glioma"
