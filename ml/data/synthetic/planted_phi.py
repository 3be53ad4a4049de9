"""Made-up, deliberately distinctive patient-identifying values planted in synthetic studies.

``make_phi(seed)`` draws a :class:`PlantedPHI` (names built from unusual syllables, IDs with
recognisable prefixes); every synthetic file carries it, and ``PlantedPHI.strings()`` lists what
a de-identification test must never find downstream.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, fields

import numpy as np

__all__ = ["PlantedPHI", "make_phi"]

_SYLLABLES = (
    "quax",
    "zor",
    "vath",
    "brix",
    "oln",
    "thra",
    "mox",
    "kel",
    "drav",
    "fenn",
    "grox",
    "hulv",
    "jor",
    "lumb",
    "nix",
    "pell",
    "quor",
    "rask",
    "sev",
    "tov",
    "vorn",
    "wex",
    "yzz",
    "zeph",
    "krul",
    "plov",
    "snar",
    "trev",
    "ulm",
    "ezz",
    "ibb",
    "orth",
)
_GIVEN_SYLLABLES = (
    "or",
    "len",
    "na",
    "mir",
    "ael",
    "tha",
    "bry",
    "vi",
    "ssa",
    "que",
    "ron",
    "dal",
    "zia",
    "ker",
    "wen",
    "ulo",
    "fey",
    "ix",
    "lio",
    "pha",
)
_STREET_KINDS = ("Road", "Lane", "Avenue", "Street", "Close", "Way")

_GENERIC_WORDS = frozenset(
    [
        "cancer",
        "centre",
        "center",
        "clinic",
        "hospital",
        "institute",
        "university",
        "medical",
        "radiotherapy",
        "oncology",
        "department",
        "planning",
        "imrt",
        "vmat",
        "street",
        "avenue",
        "close",
        "road",
        "lane",
        "drive",
        "place",
        "court",
        "square",
    ]
)


@dataclass(frozen=True)
class PlantedPHI:
    """Made-up identifying values planted in every file of a synthetic study."""

    patient_name: str  # DICOM PN, "Family^Given^M"
    patient_id: str
    birth_date: str  # YYYYMMDD
    accession_number: str
    institution_name: str
    institution_address: str
    referring_physician: str  # PN
    operator_name: str  # PN
    study_description: str  # free text with a distinctive token
    series_description: str
    other_patient_id: str
    patient_address: str
    study_id: str

    @property
    def family_name(self) -> str:
        return self.patient_name.split("^")[0]

    def strings(self) -> list[str]:
        """Every planted value that must never appear downstream of de-identification.

        The full value of every field, plus the distinctive pieces a leak could show up as on
        its own: each person-name component of 5 or more characters (family and given names)
        and each word of 5 or more characters of the free-text fields (addresses,
        institution, descriptions), except generic vocabulary ("Cancer", "Centre",
        "planning", "Street", ...), so that a grep finds leaks, not ordinary words.
        """
        out: list[str] = []

        def add(s: str) -> None:
            s = s.strip()
            if s and s not in out:
                out.append(s)

        for f in fields(self):
            add(getattr(self, f.name))
        for component in self._name_components():
            add(component)
        for word in self._distinctive_words():
            add(word)
        return out

    def _name_components(self) -> list[str]:
        """The components of 5 or more characters of the three person names."""
        return [
            comp
            for pn in (self.patient_name, self.referring_physician, self.operator_name)
            for comp in pn.split("^")
            if len(comp) >= 5
        ]

    def _distinctive_words(self) -> list[str]:
        """Words of 5 or more characters of the free-text fields, minus generic vocabulary."""
        texts = (
            self.institution_name,
            self.institution_address,
            self.study_description,
            self.series_description,
            self.patient_address,
        )
        return [
            word
            for text in texts
            for word in text.replace(",", " ").split()
            if len(word) >= 5 and word.lower() not in _GENERIC_WORDS
        ]


def _word(rng: np.random.Generator, n: int = 3, min_len: int = 8) -> str:
    while True:
        w = "".join(_SYLLABLES[int(i)] for i in rng.integers(0, len(_SYLLABLES), n))
        if len(w) >= min_len:
            return w.capitalize()


def _given(rng: np.random.Generator) -> str:
    while True:
        w = "".join(_GIVEN_SYLLABLES[int(i)] for i in rng.integers(0, len(_GIVEN_SYLLABLES), 3))
        if len(w) >= 6:
            return w.capitalize()


def _digits(rng: np.random.Generator, n: int) -> str:
    return str(int(rng.integers(10 ** (n - 1), 10**n)))


def make_phi(seed: int) -> PlantedPHI:
    """Deterministic, distinctive made-up PHI for ``seed`` (different seeds, different values)."""
    rng = np.random.default_rng([int(seed), 0x5048])
    family = _word(rng, 3, 8)
    given = _given(rng)
    middle = chr(ord("A") + int(rng.integers(0, 26)))
    birth = _dt.date(1938, 1, 1) + _dt.timedelta(days=int(rng.integers(0, 365 * 37)))
    town = _word(rng, 2, 7)
    return PlantedPHI(
        patient_name=f"{family}^{given}^{middle}",
        patient_id=f"PHI-ID-{_digits(rng, 6)}",
        birth_date=birth.strftime("%Y%m%d"),
        accession_number=f"ACX{_digits(rng, 9)}",
        institution_name=f"{_word(rng, 3, 8)} Cancer Centre",
        institution_address=f"{_digits(rng, 4)} {_word(rng, 2, 7)} Road, {town} QX{_digits(rng, 4)}",
        referring_physician=f"{_word(rng, 3, 8)}^{_given(rng)}",
        operator_name=f"{_word(rng, 3, 8)}^{_given(rng)}",
        study_description=f"HN IMRT planning CT {_word(rng, 3, 8).upper()}{_digits(rng, 4)}",
        series_description=f"CT HN 3mm {_word(rng, 2, 7)}-{_digits(rng, 5)}",
        other_patient_id=f"OPID{_digits(rng, 8)}",
        patient_address=(
            f"{_digits(rng, 3)} {_word(rng, 2, 7)} {_STREET_KINDS[int(rng.integers(0, len(_STREET_KINDS)))]}, {town}"
        ),
        study_id=f"SID{_digits(rng, 7)}",
    )
