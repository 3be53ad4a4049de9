"""The Dagster definitions, one folder per domain, discovered by convention.

``psqa_pipelines.definitions`` loads this package with ``dg.load_from_defs_folder``: every
module-level asset, asset check, job, sensor and schedule in it is registered once.
"""
