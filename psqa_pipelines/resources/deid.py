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
        """A warning the first time in a process (the console shows it once, not once per study);
        later runs record the same message at DEBUG, so every run's event log still has it."""
        if self.uses_dev_secret():
            msg = (
                "De-identification uses the development secret; set PSQA_DEID_SECRET before "
                f"ingesting real patient data (dev secret id: {DEV_SECRET[:9]}...)."
            )
            if _WARNED:
                log.debug(msg)
            else:
                _WARNED.append(True)
                log.warning(msg)


_WARNED: list[bool] = []  # the development-secret warning was shown in this process


def dev_secret_warning_shown() -> None:
    """Record that the console already showed the dev-secret warning (a worker process of a parallel
    cycle: its parent showed it), so later runs here log it at DEBUG only."""
    if not _WARNED:
        _WARNED.append(True)
