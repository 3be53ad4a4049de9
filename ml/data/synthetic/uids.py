"""Deterministic DICOM UIDs of synthetic studies (``pydicom.uid.generate_uid`` with fixed entropy)."""

from __future__ import annotations

from ml.data.synthetic.planted_phi import PlantedPHI

__all__ = ["StudyUids", "uid_from"]


def uid_from(*entropy: str) -> str:
    """The ``2.25.`` UID derived from ``entropy`` (same strings, same UID)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=list(entropy)))


class StudyUids:
    """UIDs of one synthetic patient: ``uids("series", "CT")`` is the same for the same seed and PHI."""

    def __init__(self, seed: int, phi: PlantedPHI) -> None:
        self.base = [f"psqa-sample-data/{int(seed)}", phi.patient_id, phi.patient_name]

    def __call__(self, *role: object) -> str:
        return uid_from(*self.base, *(str(r) for r in role))
