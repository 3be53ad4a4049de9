"""De-identification settings: the pseudonymisation secret."""


import dagster as dg
from pydantic import Field

from ml.data.dicom.deid import DEV_SECRET, Pseudonymizer, resolve_secret


class DeidentificationResource(dg.ConfigurableResource):
    """Keyed-hash pseudonyms (HMAC-SHA256) for partition keys, patient ids and UIDs.

    Configure ``secret`` from an environment variable (``PSQA_DEID_SECRET``); when empty, the
    same variable is read at run time, and without it the documented development secret is
    used (and a warning is logged): fine for the synthetic demo, never for patient data.
    """

    secret: str = Field(default="", description="HMAC key; leave empty to read PSQA_DEID_SECRET")

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
