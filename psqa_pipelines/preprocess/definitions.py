import dagster as dg

from psqa_pipelines.preprocess.assets import study_volumes

defs = dg.Definitions(assets=[study_volumes])
