"""The RT Dose (PLAN summation) of a synthetic H&N study, on its own grid over the body."""

from __future__ import annotations

from pathlib import Path

from ml.data.dicom.writers import (
    RT_DOSE_STORAGE,
    RT_PLAN_STORAGE,
    RT_STRUCT_STORAGE,
    image_reference,
    set_rt_dose_grid,
    write_dataset,
)
from ml.data.synthetic.dose import PlanDose
from ml.data.synthetic.geometry import ds_mm
from ml.data.synthetic.grid import CTGrid
from ml.data.synthetic.headers import StudyHeader
from ml.data.synthetic.layout import clear_dcm_files, rtdose_path

__all__ = ["RTDOSE_SERIES_NUMBER", "write_rtdose"]

RTDOSE_SERIES_NUMBER = 4


def write_rtdose(
    study: Path,
    header: StudyHeader,
    grid: CTGrid,
    dose: PlanDose,
    *,
    sop_uid: str,
    series_uid: str,
    plan_uid: str,
    rtstruct_uid: str | None,
) -> Path:
    """Write ``dose`` (frames on the CT slices) referencing the (unwritten) RT Plan and the structure set."""
    ds = header.dataset(
        sop_class=RT_DOSE_STORAGE,
        sop_uid=sop_uid,
        modality="RTDOSE",
        series_uid=series_uid,
        series_number=RTDOSE_SERIES_NUMBER,
    )
    ds.InstanceNumber = 1
    set_rt_dose_grid(
        ds,
        dose.stored,
        position=[ds_mm(dose.origin[0]), ds_mm(dose.origin[1]), grid.z_strings[0]],
        orientation=["1", "0", "0", "0", "1", "0"],
        pixel_spacing=[ds_mm(dose.spacing[0]), ds_mm(dose.spacing[1])],
        frame_offsets=[ds_mm(z - grid.zs[0]) for z in grid.zs],
        slice_thickness=ds_mm(grid.slice_thickness),
        dose_grid_scaling="1e-06",
        frame_of_reference_uid=header.frame_of_reference_uid,
        summation_type="PLAN",
    )
    ds.ReferencedRTPlanSequence = [image_reference(RT_PLAN_STORAGE, plan_uid)]
    if rtstruct_uid is not None:
        ds.ReferencedStructureSetSequence = [image_reference(RT_STRUCT_STORAGE, rtstruct_uid)]
    clear_dcm_files(study / "RTDOSE")
    path = rtdose_path(study, header.phi)
    write_dataset(ds, path)
    return path
