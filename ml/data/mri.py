"""Brain MRI: sequence identification, co-registration to one grid and intensity normalisation.

Sequence labels are ``t1`` (native T1), ``t1c`` (post-contrast T1), ``t2``, ``flair`` and ``seg``
(a label map). They are derived *before* de-identification from the file name (BraTS
``-t1n/-t1c/-t2w/-t2f/-seg``, TCGA ``_t1/_t1c/_t2/_fla``, clinical ``T1 AX POST GAD`` ...) or,
for DICOM, from the series description, protocol and sequence names plus the contrast-agent
attribute; only the label is stored.

Co-registration (``coregister``): the reference is T1c (else T1, FLAIR, T2), put on the
canonical LPS grid. Every other sequence is first resampled through world coordinates (same
scanner session, so headers already align them); when ``rigid=True`` a rigid (Euler 3D)
registration with Mattes mutual information refines the alignment (multi-resolution 4/2,
10 % fixed-seed sampling, deterministic). Sequences already on the reference grid (BraTS,
skull-stripped data) skip registration. Label maps are resampled with nearest neighbour.

Normalisation: z-score over the foreground (non-zero voxels for skull-stripped data, else an
Otsu threshold of the image), background set to 0 -- the nnU-Net scheme for MRI.
"""

from __future__ import annotations

import re

import numpy as np

from ml.data.volume import Volume, resample_to, to_canonical

__all__ = [
    "REFERENCE_ORDER",
    "SEQUENCES",
    "coregister",
    "foreground_mask",
    "sequence_from_dicom",
    "sequence_from_text",
    "zscore",
]

SEQUENCES = ("t1", "t1c", "t2", "flair")
REFERENCE_ORDER = ("t1c", "t1", "flair", "t2")


def _tokens(text: str) -> list[str]:
    return [t for t in re.split(r"[^a-z0-9]+", text.lower()) if t]


def sequence_from_text(text: str, has_contrast: bool = False) -> str | None:
    """Map free text (file name, series description) to a sequence label, or None."""
    toks = _tokens(re.sub(r"\.nii(\.gz)?$", "", text, flags=re.IGNORECASE))
    ts = set(toks)
    joined = " ".join(toks)
    if ts & {"seg", "segmentation", "label", "labels", "mask"}:
        return "seg"
    if ts & {"flair", "fla", "t2f", "t2flair", "darkfluid"} or "flair" in joined:
        return "flair"
    contrast = bool(ts & {"t1c", "t1ce", "t1gd", "t1post", "t1wce", "t1c+", "gad", "gd", "contrast", "mprage_gd"}) or (
        "post" in ts and bool(ts & {"t1", "t1w", "gad", "gd"})
    )
    if contrast:
        return "t1c"
    if ts & {"t2", "t2w", "t2tse", "tse_t2"}:
        return "t2"
    if ts & {"t1", "t1n", "t1w", "mprage", "spgr"}:
        return "t1c" if has_contrast else "t1"
    return None


def sequence_from_dicom(ds) -> str | None:
    text = " ".join(str(ds.get(k, "") or "") for k in ("SeriesDescription", "ProtocolName", "SequenceName"))
    has_contrast = bool(str(ds.get("ContrastBolusAgent", "") or "").strip())
    label = sequence_from_text(text, has_contrast=has_contrast)
    if label is None:
        ti = float(ds.get("InversionTime", 0) or 0)
        te = float(ds.get("EchoTime", 0) or 0)
        tr = float(ds.get("RepetitionTime", 0) or 0)
        if ti > 1500 and te > 70:
            label = "flair"
        elif te > 70 and tr > 2000:
            label = "t2"
        elif 0 < te < 30 and 0 < tr < 1000:
            label = "t1c" if has_contrast else "t1"
    return label


def _register_rigid(fixed: Volume, moving: Volume, seed: int = 1234):
    import SimpleITK as sitk

    f = sitk.Cast(fixed.to_sitk(), sitk.sitkFloat32)
    m = sitk.Cast(moving.to_sitk(), sitk.sitkFloat32)
    # start from the scanner-header alignment (identity in world space), rotating about the
    # centre of the fixed image
    init = sitk.Euler3DTransform()
    size = np.asarray(f.GetSize(), dtype=float)
    init.SetCenter(f.TransformContinuousIndexToPhysicalPoint(tuple((size - 1) / 2.0)))
    reg = sitk.ImageRegistrationMethod()
    reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    reg.SetMetricSamplingStrategy(reg.RANDOM)
    reg.SetMetricSamplingPercentage(0.1, seed)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-3, numberOfIterations=100, relaxationFactor=0.5
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel([4, 2])
    reg.SetSmoothingSigmasPerLevel([2, 1])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    reg.SetInitialTransform(init, inPlace=False)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    transform = reg.Execute(f, m)
    return transform, float(reg.GetMetricValue())


def _apply(moving: Volume, reference: Volume, transform, nearest: bool) -> Volume:
    import SimpleITK as sitk

    ref_img = Volume(
        np.zeros(reference.array.shape, np.uint8), reference.spacing, reference.origin, reference.direction
    ).to_sitk()
    src = moving.array.astype(np.float32) if not nearest else moving.array
    m = Volume(src, moving.spacing, moving.origin, moving.direction).to_sitk()
    out = sitk.Resample(
        m, ref_img, transform, sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear, 0.0, m.GetPixelID()
    )
    return reference.with_array(sitk.GetArrayFromImage(out))


def coregister(volumes: dict[str, Volume], rigid: bool = True) -> tuple[dict[str, Volume], dict[str, dict]]:
    """Put all sequences (and ``seg``) on the reference sequence's canonical grid."""
    present = [s for s in REFERENCE_ORDER if s in volumes]
    if not present:
        raise ValueError("no MRI sequence to use as reference")
    ref_name = present[0]
    reference = to_canonical(volumes[ref_name])
    out = {ref_name: reference.with_array(reference.array.astype(np.float32))}
    report: dict[str, dict] = {ref_name: {"role": "reference", "registered": False}}
    for name, vol in volumes.items():
        if name == ref_name:
            continue
        nearest = name == "seg"
        if vol.same_grid(volumes[ref_name], atol=1e-3) or vol.same_grid(reference, atol=1e-3):
            res = resample_to(to_canonical(vol), reference, interpolation="nearest" if nearest else "linear")
            out[name] = res
            report[name] = {"role": "moving", "registered": False, "reason": "same grid"}
            continue
        if rigid and not nearest:
            transform, metric = _register_rigid(reference, vol)
            out[name] = _apply(vol, reference, transform, nearest=False)
            report[name] = {
                "role": "moving",
                "registered": True,
                "metric": metric,
                "parameters": [float(p) for p in transform.GetParameters()],
            }
        else:
            out[name] = resample_to(vol, reference, interpolation="nearest" if nearest else "linear")
            report[name] = {"role": "moving", "registered": False, "reason": "world-coordinate resampling"}
        if not nearest:
            out[name] = out[name].with_array(out[name].array.astype(np.float32))
    return out, report


def foreground_mask(arr: np.ndarray) -> np.ndarray:
    nz = arr > 0
    if nz.mean() < 0.9:  # skull-stripped or background already zero
        return nz
    import SimpleITK as sitk

    img = sitk.GetImageFromArray(arr.astype(np.float32))
    return sitk.GetArrayFromImage(sitk.OtsuThreshold(img, 0, 1)).astype(bool)


def zscore(arr: np.ndarray, mask: np.ndarray | None = None) -> tuple[np.ndarray, float, float]:
    if mask is None:
        mask = foreground_mask(arr)
    vals = arr[mask]
    if vals.size == 0:
        return np.zeros_like(arr, dtype=np.float32), 0.0, 1.0
    mean, std = float(vals.mean()), float(vals.std())
    std = std if std > 1e-6 else 1.0
    out = np.zeros(arr.shape, dtype=np.float32)
    out[mask] = (arr[mask] - mean) / std
    return out, mean, std
