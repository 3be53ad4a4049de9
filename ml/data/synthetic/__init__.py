"""Synthetic studies written as real DICOM with planted PHI: head-and-neck CT + RT, brain MRI."""

from ml.data.synthetic.hn_study import ROI_NAMES, PlantedPHI, StudyTruth, generate_hn_cohort, generate_hn_study, make_phi
from ml.data.synthetic.mri_study import MRStudyTruth, generate_mr_study

__all__ = [
    "ROI_NAMES",
    "MRStudyTruth",
    "PlantedPHI",
    "StudyTruth",
    "generate_hn_cohort",
    "generate_hn_study",
    "generate_mr_study",
    "make_phi",
]
