import dagster as dg

from psqa_pipelines.constants import STUDIES_PARTITION

# One partition per study, keyed by its pseudonymous id (dcm-/nii-/kbp-<16 hex>): the keys are
# keyed hashes, so they never reveal a patient or study identifier.
studies_partitions = dg.DynamicPartitionsDefinition(name=STUDIES_PARTITION)
