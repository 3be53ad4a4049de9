"""Names shared across the Dagster layer (groups read as the data flow in the UI)."""

INGEST = "ingest"
PREPROCESS = "preprocess"
LAKE = "lake_tables"

OWNER_DATA = "team:data-engineering"
OWNER_ML = "team:ml"
OWNER_PHYSICS = "team:medical-physics"

STUDIES_PARTITION = "studies"
