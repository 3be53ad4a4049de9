"""De-identification settings: the pseudonymisation secret."""

import dagster as dg
from pydantic import Field

from ml.data.dicom.deid import DEV_SECRET, Pseudonymizer, resolve_secret


class DeidentificationResource(dg.ConfigurableResource):
    """Keyed-hash pseudonyms (HMAC-SHA256) for partition keys, patient ids and UIDs.

    ``secret`` comes from ``psqa_pipelines.settings.deid_secret_config``: ``dg.EnvVar("PSQA_DEID_SECRET")``
    when that variable is set where the code location loads (resolved by Dagster at run time),
    else empty, and empty means the documented development secret (a warning is logged): fine
    for the synthetic demo, never for patient data.
    """

    secret: str = Field(
        default="",
        description="HMAC key (set PSQA_DEID_SECRET before the code location loads); empty = the development secret",
    )

    def pseudonymizer(self) -> Pseudonymizer:
        return Pseudonymizer(self.secret or None)

    def uses_dev_secret(self) -> bool:
        return resolve_secret(self.secret or None)[1]

    def warn_if_dev(self, log) -> None:
        if self.uses_dev_secret():
            log.warning(
                "De-identification uses the development secret; set PSQA_DEID_SECRET before "
                f"ingesting real patient data (dev secret id: {DEV_SECRET[:9]}...)."
            )
