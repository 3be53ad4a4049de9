"""Synthetic studies written as real DICOM with planted PHI: head-and-neck CT + RT, brain MRI.

Modules: ``planted_phi`` (the made-up identifying values), ``uids`` and ``headers`` (what every
synthetic DICOM object starts from), ``layout`` (folders and file names), ``geometry`` and
``grid`` (polygons, masks, the CT grid), ``anatomy`` (the H&N phantom), ``dose`` (its plan
dose), ``write_ct`` / ``write_rtstruct`` / ``write_rtdose`` (the three H&N objects),
``hn_study`` (``generate_hn_study``, ``generate_hn_cohort``), ``mri_phantom`` and ``mri_study``
(``generate_mr_study``).
"""

from ml.data.synthetic.anatomy import ROI_NAMES
from ml.data.synthetic.hn_study import StudyTruth, generate_hn_cohort, generate_hn_study
from ml.data.synthetic.mri_study import MRStudyTruth, generate_mr_study
from ml.data.synthetic.planted_phi import PlantedPHI, make_phi

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
