"""The champion/challenger promotion step shared by the model families: move the ``champion`` alias
of a registered model to the challenger version after the blocking comparison check passed."""

import dagster as dg

from psqa_pipelines.constants import CHAMPION_ALIAS
from psqa_pipelines.resources import MlflowResource


def move_champion_alias(mlflow: MlflowResource, model_name: str, version: str, run_id: str) -> None:
    """Point ``champion`` at ``version`` and tag that version with the Dagster run that promoted it."""
    mlflow.set_alias(model_name, CHAMPION_ALIAS, version)
    mlflow.client().set_model_version_tag(model_name, version, "promoted_by_dagster_run", run_id)


def promote_challenger(context: dg.AssetExecutionContext, mlflow: MlflowResource, model_name: str, row) -> dict:
    """``row``: the challenger evaluation's one row (``promote``, ``reason``, ``challenger_version``,
    ``champion_version``). Moves the alias, tags the version with the Dagster run, records the
    materialization metadata and returns the common part of the champion table's row."""
    if not bool(row["promote"]):  # defence in depth: the blocking check should have stopped us
        raise dg.Failure(f"challenger did not beat the champion: {row['reason']}")
    version = str(row["challenger_version"])
    move_champion_alias(mlflow, model_name, version, context.run.run_id)
    context.add_output_metadata(
        {
            "champion_version": version,
            "previous_champion": str(row["champion_version"]),
            "reason": str(row["reason"]),
            "mlflow_model": dg.MetadataValue.url(mlflow.model_version_url(model_name, version)),
        }
    )
    return {
        "champion_version": version,
        "previous_champion": str(row["champion_version"]),
        "reason": str(row["reason"]),
    }
