"""psqa_pipelines: the Dagster layer (assets, checks, sensors, resources) over the ``ml`` core."""
