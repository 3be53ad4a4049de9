"""Descriptions of the lake tables' columns, shown in the Dagster UI's column schema.

``describe_column(name)`` looks the name up in ``COLUMN_DOCS`` (one literal entry per column that
follows no pattern), then in ``COLUMN_PATTERNS`` (families such as ``auc_<task>``, ``p_<class>``,
``gpr_<dose>_<dta>``, ``delta_auc_<task>_lo``: a regex that must match the whole name and a
template filled with the regex's named groups), and returns None for an unknown name.
``psqa_pipelines.resources.parquet_io.table_schema`` puts the result on every ``TableColumn``.

Abbreviations: OOF = out-of-fold (each glioma patient predicted by the cross-validation model that
did not train on it); GPR = gamma passing rate; DD = dose difference; pp = percentage points.
"""

from __future__ import annotations

import re

COLUMN_DOCS = {
    # -- ids and keys ---------------------------------------------------------------------------
    "study_key": "pseudonymous study id (keyed hash; dcm-/nii-/kbp- prefix = source) = partition key",
    "patient_id": "pseudonymous patient id (pt-<keyed hash>); contour_dose tables: the case id (= study_key)",
    "source": "dicom | nifti | openkbp; glioma: lgg-mri | brain-mri-samples; quarantine also: unknown, qa_results",
    "modality": "CT, MR, RTSTRUCT, RTDOSE, RTPLAN (OpenKBP: CT, RTDOSE, RTSTRUCT per ROI file, MASK, META)",
    "sop_class_uid": "DICOM SOP class (standard UID, not identifying)",
    "sop_instance_uid": "remapped SOP instance UID (2.25.<keyed hash>)",
    "series_instance_uid": "remapped series instance UID",
    "frame_of_reference_uid": "remapped frame of reference UID (links CT, RTSTRUCT and RTDOSE)",
    "series_key": "short pseudonymous series key (folder name of the stored copies)",
    "object_key": "image series key, or the key of one RT object",
    "sequence": "MRI sequence label derived before de-identification: t1, t1c, t2, flair, seg",
    "roi_name": "canonical ROI name (OpenKBP mask files)",
    "roi_names": "canonical ROI names in the structure set, comma separated",
    "stored_path": "de-identified copy, relative to the lake root",
    "sha256": "sha256 (hex) of the stored file",
    "source_sha256": "sha256 (hex) of the source file as it arrived",
    "size_bytes": "size of the stored file in bytes",
    "referenced_series_key": "image series an RTSTRUCT/RTDOSE belongs to",
    "referenced_object_key": "RT Plan an RTDOSE refers to",
    "dose_max": "maximum dose in the grid (DoseUnits)",
    "treatment_machine": "treatment machine of the plan (keyed pseudonym M-... of TreatmentMachineName); a feature",
    "qa_device": "QA device of the measurement (model + keyed pseudonym D-... of its serial); a plan feature",
    "path": "the row's file: relative to the lake root; glioma_training_data: to data_dir; contour_dose_*: absolute",
    "kind": (
        "volume kind ct | mask | dose | pdm | mr | seg; contour_dose_exports: rtdose | rtstruct | *_nifti | labels_json"
    ),
    "grid_id": "hash of shape, spacing, origin and direction: equal ids = same voxel grid",
    "reference_key": "volume whose grid this one shares (the CT or the reference MRI sequence)",
    "units": "HU, Gy, z-score or empty (masks)",
    "vmin": "minimum voxel value",
    "vmax": "maximum voxel value",
    "vmean": "mean voxel value",
    "nonzero": "number of non-zero voxels",
    "reason": "quarantine reason code; *_challenger_eval / *_champion: why the challenger was (not) promoted",
    "detail": "our own explanation (never quotes file content or paths)",
    "quarantine_ref": "folder under $PSQA_HOME/quarantine holding the file and record.json",
    "quarantined_at": "UTC time the file was quarantined",
    "action": "moved (inbox) or copied (read-only source)",
    # -- DICOM / NIfTI geometry (file_index, series_index) -----------------------------------------
    "rows": "pixel rows of an image or dose frame (DICOM Rows; NIfTI: array axis 1); 0 = no pixel data",
    "columns": "pixel columns of an image or dose frame (DICOM Columns; NIfTI: array axis 2); 0 = no pixel data",
    "n_frames": "frames in the file (DICOM NumberOfFrames, 1 if single-frame; NIfTI / OpenKBP: slices)",
    "pixel_spacing_x": "column spacing in mm (DICOM PixelSpacing[1]); NaN = none",
    "pixel_spacing_y": "row spacing in mm (DICOM PixelSpacing[0]); NaN = none",
    "slice_thickness": "DICOM SliceThickness in mm (NIfTI / OpenKBP: slice spacing); NaN = none",
    "orientation": "direction cosines, comma separated: row then column (ImageOrientationPatient); NIfTI series: 3 x 3",
    "n_files": "files that make up the series or object (RT objects: 1; OpenKBP: the patient folder's files)",
    "referenced_beam": "beam number a per-beam RT Dose refers to; -1 = plan/composite dose; 0 on other rows",
    "n_rois": "ROIs in the structure set (StructureSetROISequence items, named or not)",
    "dose_units": "RT Dose DoseUnits as stored (e.g. GY); empty = not a dose",
    "dose_summation_type": "RT Dose DoseSummationType: PLAN | BEAM | RECORD (= delivered / measured); empty otherwise",
    "n_beams": "treatment beams in the RT Plan (series tables: RTPLAN rows only, else 0)",
    "status": "series tables: ok; contour_dose_cases: ok | no_oars | predict_only | no_dose (+ ;ignored_ct:N)",
    # -- study_index -------------------------------------------------------------------------------
    "modalities": "modalities present in the study, comma separated",
    "n_series": "image series and RT objects of the study (its series_index rows)",
    "n_volumes": "preprocessed volumes of the study (its volume_manifest rows)",
    "has_ct": "the study has a CT series",
    "has_structures": "the study has at least one canonically named ROI",
    "has_dose": "study_index: RT Dose or dose grid; contour_dose_cases: a planned dose; predictions: dose predicted",
    "has_mr": "the study has an MR series",
    "has_plan": "the study has an RT Plan",
    "mr_sequences": "MRI sequence labels of the study (t1, t1c, t2, flair), comma separated",
    # -- volume_manifest ---------------------------------------------------------------------------
    "volume_key": (
        "volume id = file stem under lake/volumes/<study>/, e.g. <series_key>/ct, <series_key>/mask_<ROI>, mr_t1"
    ),
    "name": "CT | ROI name (mask) | dose summation type (dose, e.g. PLAN) | possible_dose_mask | MR sequence | seg",
    "dtype": "numpy dtype of the stored voxels (int16 CT, uint8 masks, float32 dose and MR)",
    "direction": "9 direction cosines of the voxel axes, comma separated (canonical LPS grid = identity)",
    "source_object": "what the volume was made from: CT series key, RTSTRUCT/RTDOSE object key, dicom-mr or nifti",
    # -- glioma lake (ml.glioma.lake) -----------------------------------------------------------------
    "subject_id": "pseudonym of the person (the same TCGA patient in two sources shares it); else = patient_id",
    "layout": "slices (2D stack without geometry, lgg-mri) | volume (3D, co-registered)",
    "shape": "NIfTI shape i x j x k (columns x rows x slices)",
    "spacing_known": "False: the source records no geometry (written at a nominal 1 mm)",
    "histology": "astrocytoma | oligoastrocytoma | oligodendroglioma (pre-2016 WHO); null = unknown",
    "grade": "WHO grade G2 | G3; null = unknown",
    "idh": "IDH status WT | Mutant; null = unknown",
    "codel": "1p/19q co-deletion non-codel | codel; null = unknown",
    "n_slices": "number of slices (of the image series; glioma tables: axial slices of the case)",
    "n_tumour_slices": "slices with tumour in the mask; null = no mask",
    "missing_sequences": "model sequences (flair, t1c, t1, t2) absent for the case, ';'-separated",
    "fold": "cross-validation fold 0..k-1 (OOF tables: the held-out fold); -1 = unlabelled pool",
    "stratum": (
        "glioma_folds: IDH/1p19q combination (unknown = own stratum); psqa_split: fail (GPR 2%/2mm < 90 %) | pass"
    ),
    "present": "sequences in the exported case, ';'-separated in model order (flair;t1c;t1;t2)",
    "has_mask": "the exported case has a tumour mask (seg)",
    "data_dir": "glioma training layout folder lake/glioma/training (absolute path)",
    "data_digest": "16-hex digest of the exported glioma training data (npz files + labels.csv)",
    # -- glioma models, cross-validation and evaluation --------------------------------------------
    "val_dice": "mean patient Dice on the validation patients at the best epoch",
    "n_train_patients": "patients the model trained on (the non-validation part of its patients)",
    "n_val_patients": "stratified validation patients (epoch selection and temperature fitting)",
    "tumour_voxels": "predicted tumour voxels (pixels of the 128 x 128 grid summed over slices), post-processed",
    "slices_used": "slices whose logits form the patient prediction (>= 10 tumour pixels, else the top 3)",
    "dice": "Dice of the OOF predicted tumour mask vs the reference over the slice stack; NaN = no mask",
    "cv_dir": "cross-validation folder lake/glioma/cv/<key of data, folds and settings> (absolute path)",
    "cv_run_id": "MLflow parent run id of the variant's cross-validation (cv-<variant>)",
    "n_patients": "patients scored (pooled OOF predictions of the row)",
    "dice_mean": "mean OOF Dice over the patients with a reference mask",
    "dice_std": "standard deviation of the OOF Dice over those patients",
    "score": "pooled score in [0, 1]: mean of dice_mean and the defined task AUCs (higher is better)",
    "removed": "sequences removed from the fusion, '+'-joined (e.g. flair+t1); none = full input",
    "model": (
        "glioma: GMMAS | majority | radiomics LR (GT masks); PSQA: variant | mean predictor; contour_dose: display name"
    ),
    "task": "glioma_evaluation: idh | codel | grade | histology; psqa_shapley_report: gpr | dd",
    "n": "patients with a known label for the task (pooled OOF)",
    "auc": "pooled OOF AUC for the task (histology: macro one-vs-rest); NaN = only one class",
    "auc_lo": "lower bound of the 95 % percentile bootstrap CI of auc (patients resampled)",
    "auc_hi": "upper bound of the 95 % percentile bootstrap CI of auc (patients resampled)",
    "auc_ci": "auc and its CI as text, e.g. '0.81 [0.70, 0.90]'; n/a = undefined",
    "balanced_accuracy": "mean of sensitivity and specificity at p >= 0.5 (histology: mean per-class recall)",
    "ece": "expected calibration error (10 confidence bins) of the model's probabilities (GMMAS: temperature-scaled)",
    "markdown": "per-patient report, Markdown (absolute path)",
    "html": "per-patient report, HTML (absolute path)",
    "figure": "report figure PNG with predicted and reference contours (absolute path); empty = none",
    # -- champion / challenger ---------------------------------------------------------------------
    "metric": "deciding metric: oof_score (higher is better) | val_loss (lower is better); empty = none comparable",
    "challenger_version": "registered-model version of the newly trained model (the challenger)",
    "champion_version": (
        "version holding the champion alias: before the decision (*_challenger_eval), after (*_champion)"
    ),
    "previous_champion": "version that held the champion alias before the move; empty = none",
    "promote": "True = the challenger wins (or no champion exists): *_champion moves the alias",
    "details": 'JSON with the promoted model\'s headline metric, e.g. {"mae": test MAE 2%/2mm in pp}',
    "challenger_model_dir": "model folder of the challenger (absolute path)",
    # -- training assets (all families) ------------------------------------------------------------
    "variant": (
        "model variant: PSQA bmmqa, concat, *_only ...; contour_dose contour-only ... product; glioma gmmas, ablations"
    ),
    "model_dir": "folder of the trained model: lake/models/<family>/<variant>/<Dagster run id> (absolute)",
    "mlflow_run_id": "MLflow run id of the model's training run",
    "model_id": "MLflow logged-model id (m-...) of the trained model",
    "registered_model": "MLflow registered model name; empty = logged, not registered (PSQA baselines)",
    "model_version": "MLflow registered model version; empty = not registered",
    "best_epoch": "epoch (0-based) with the best validation monitor; its weights are the model (model_best.pt)",
    "epochs_run": "epochs trained (early stopping or the time budget can stop before the maximum)",
    "device": "device that trained the model: cpu or the CUDA GPU's name",
    "best_val": "best validation monitor: MAE of GPR 2%/2mm in pp (dd_only: DD MAE, % of planned max)",
    "best_val_loss": "lowest validation loss: glioma (1 - Dice) + mean task NLL; contour_dose: sum of task losses",
    "train_samples_per_s": "training throughput, plans per second",
    "train_slices_per_s": "training throughput, 2D slices per second",
    "evaluation_run_id": "MLflow run id of the evaluation run",
    "split": "train | val | test (contour_dose_predictions also: inference = new patients without a dose)",
    # -- PSQA: plans, complexity (ml.psqa.complexity; plan rows: MU-weighted mean over beams) --------
    "plan_key": "short pseudonymous key of the RT Plan (its object_key, ob-<hash>)",
    "plan_uid": "remapped SOP instance UID of the RT Plan (2.25.<keyed hash>)",
    "beam_number": "BeamNumber of the treatment beam in the RT Plan",
    "beam": "beam number the GPR refers to; -1 = composite (all beams)",
    "total_mu": "beam meterset in MU per fraction; plan: sum",
    "n_control_points": "control points; plan: sum",
    "n_segments": "apertures delivering MU (segments or VMAT control arcs); plan: sum",
    "mu_per_segment": "total_mu / n_segments in MU; plan: sum MU / sum segments",
    "mcs": "modulation complexity score MU-weighted LSV x AAV (McNiven 2010), 0..1, lower = more complex",
    "lsv": "leaf sequence variability (McNiven 2010), MU-weighted, 0..1",
    "aav": "aperture area variability (McNiven 2010): area / the beam's leaf-wise envelope area, MU-weighted, 0..1",
    "mean_area_mm2": "MU-weighted mean aperture area in mm² (open, jaw-clipped leaf pairs)",
    "min_area_mm2": "smallest aperture area carrying MU in mm²; plan: min",
    "fraction_small_segments": "fraction of the MU delivered through apertures < 4 cm²",
    "edge_metric": "MU-weighted aperture perimeter / area in 1/mm (Younge aperture complexity)",
    "aperture_irregularity": "MU-weighted perimeter² / (4 pi area), 1 = circle; plan: plan irregularity (Du 2014)",
    "plan_modulation": "beam modulation 1 - sum MU_j A_j / (MU A_union) (Du 2014); plan: MU-weighted PM",
    "mean_leaf_gap_mm": "MU-weighted mean effective (jaw-clipped) gap of the open leaf pairs in mm",
    "min_leaf_gap_mm": "smallest effective gap of an open leaf pair in mm; plan: min",
    "leaf_travel_mm": "leaf travel in mm summed over both banks, all leaves and control points; plan: sum",
    "n_moving_leaves": "leaves (both banks) travelling more than 1e-3 mm; plan: sum",
    "leaf_travel_per_moving_leaf": "leaf_travel_mm / n_moving_leaves in mm (0 if none moves); plan: ratio of sums",
    "leaf_travel_per_mu": "leaf_travel_mm / total_mu in mm per MU (LTMU); plan: ratio of sums",
    "jaw_x_mm": "MU-weighted X jaw opening X2 - X1 in mm (400 when the plan has no X jaws)",
    "jaw_y_mm": "MU-weighted Y jaw opening Y2 - Y1 in mm",
    "jaw_area_mm2": "MU-weighted jaw rectangle area in mm²",
    "field_area_union_mm2": "area of the union of the beam's apertures in mm²",
    "field_eq_square_mm": "equivalent square 4 A / P of the union aperture in mm",
    "arc_length_deg": "gantry rotation summed over the control points in degrees (0 = static beam); plan: sum",
    "mean_gantry_spacing_deg": "arc_length_deg / (n_control_points - 1) in degrees",
    "modulation_index": "Webb 2003 fluence modulation index on the beam's 2 mm fluence map",
    "mu_per_gy": "plan MU per fraction / dose per fraction in Gy; NaN without prescription and fraction count",
    # -- PSQA: QA planes and labels --------------------------------------------------------------
    "size": "side of the square QA dose plane in pixels",
    "spacing_mm": "pixel spacing of the QA planes in mm",
    "planned_max_gy": "maximum of the composite planned dose plane in Gy",
    "dd_mean": "mean dose difference delivered - planned over the plane, % of planned max; composite rows only",
    "dd_abs_mean": "mean |delivered - planned| over the composite plane, % of the planned maximum",
    "dd_abs_p95": "95th percentile of |delivered - planned|, % of planned max; composite rows only",
    "criterion": "gamma criterion dose % / distance mm, e.g. 3%/2mm",
    "gpr": "gamma passing rate (%) reported by the clinic's QA system",
    "gpr_pipeline": "our composite GPR (%) at the criterion (psqa_labels)",
    "gpr_clinic": "the clinic QA system's composite GPR (%) for the same plan and criterion",
    "diff_pp": "gpr_pipeline - gpr_clinic in percentage points",
    # -- PSQA: training pack, models, evaluation --------------------------------------------------
    "pack_dir": "training pack folder lake/psqa/packs/<digest> (absolute path)",
    "pack_digest": "digest of the psqa_pack the model was trained or compared on",
    "plans": "plans in the training pack (all splits)",
    "n_plans": "plans in the training pack the model was trained from (all splits)",
    "dataset_sha256": "sha256 (hex) of the pack's dataset.parquet",
    "digest": "16-hex content digest: cases: source volumes; contour_dose_cache: cases + split; psqa_pack: its inputs",
    "MAE GPR<90 (2%/2mm)": "test MAE (pp) of predicted GPR 2%/2mm on the plans measured < 90 % (the failing plans)",
    "DD SSIM mean": "mean SSIM of predicted vs measured DD maps over the test plans",
    "DD SSIM max": "maximum SSIM of predicted vs measured DD maps over the test plans",
    "DD MAE (%)": "mean |predicted - measured| DD on the test plans, % of the planned maximum",
    # -- contour + dose ----------------------------------------------------------------------------
    "case_id": "case = one study (its study_key); the patient_id of the cache, split and predictions",
    "ct_path": "CT volume, relative to the lake root",
    "pdm_path": "possible-dose mask volume, relative to the lake root; empty = none",
    "dose_path": "planned dose volume (PLAN first), relative to the lake root; empty = no dose",
    "mask_paths": "JSON {ROI name: mask volume path relative to the lake root}",
    "rois": "ROIs with a mask (OpenKBP set: 7 OARs, PTV56, PTV63, PTV70), comma separated",
    "n_oars": "organ-at-risk masks of the case (ROIs other than PTVs)",
    "cache_dir": "contour + dose training cache folder lake/contour_dose/cache (absolute path)",
    "cache_digest": "digest of the contour_dose_cache the model was trained on",
    "patients": "contour_dose_cache: patients cached; contour_dose_evaluation: test patients the model predicted",
    "bytes": "total size of the cached patient files in bytes",
    "has_contours": "the prediction includes a label map (contours)",
    "mean_dice": "mean Dice over test patients x ROIs of the predicted label map; NaN = no contours",
    "mean_hd95_mm": "mean 95th-percentile Hausdorff distance over test patients x ROIs in mm",
    "dose_score": "OpenKBP dose score: mean over patients of the dose MAE inside the possible-dose mask, Gy",
    "dvh_score": "OpenKBP DVH score: mean absolute error of the DVH metrics over patients x ROIs, Gy",
}

_TASK = r"(?P<task>idh|codel|grade|histology)"  # the glioma classification tasks
_CLASS = r"(?P<cls>idh_mutant|codel|grade_g3|astrocytoma|oligoastrocytoma|oligodendroglioma)"
_CRIT = r"(?P<crit>\d+%/\d+mm)"
_SPLIT = r"(?P<split>train|val|test)"

#: (regex matching the whole column name, template filled with the named groups)
COLUMN_PATTERNS: list[tuple[re.Pattern[str], str]] = [
    # glioma per-task summaries (ml.glioma.selection.variant_summary; ablation and missing-modality tables)
    (re.compile(rf"auc_{_TASK}"), "pooled OOF AUC for {task} (histology: macro one-vs-rest); NaN = undefined"),
    (
        re.compile(rf"auc_lo_{_TASK}"),
        "lower bound of the 95 % percentile bootstrap CI of auc_{task} (patients resampled)",
    ),
    (
        re.compile(rf"auc_hi_{_TASK}"),
        "upper bound of the 95 % percentile bootstrap CI of auc_{task} (patients resampled)",
    ),
    (re.compile(rf"bacc_{_TASK}"), "OOF balanced accuracy for {task} at p >= 0.5 (histology: mean per-class recall)"),
    (
        re.compile(rf"ece_{_TASK}"),
        "OOF expected calibration error (10 bins) for {task} after temperature scaling (p_*)",
    ),
    (
        re.compile(rf"ece_raw_{_TASK}"),
        "OOF expected calibration error (10 bins) for {task} before temperature (raw_p_*)",
    ),
    # differences to the reference row (ablation: gmmas on the same patients; missing modality: removed = none)
    (
        re.compile(rf"delta_(?P<metric>dice_mean|score|auc_{_TASK})"),
        "{metric} minus the reference row's: ablation gmmas (same patients); missing-modality removed = none",
    ),
    (
        re.compile(rf"delta_(?P<metric>dice_mean|auc_{_TASK})_lo"),
        "lower bound of the paired 95 % bootstrap CI (patients resampled) of delta_{metric}",
    ),
    (
        re.compile(rf"delta_(?P<metric>dice_mean|auc_{_TASK})_hi"),
        "upper bound of the paired 95 % bootstrap CI (patients resampled) of delta_{metric}",
    ),
    (
        re.compile(rf"delta_(?P<metric>dice_mean|auc_{_TASK})_p"),
        "two-sided paired-bootstrap p-value of delta_{metric} = 0",
    ),
    # glioma predictions (ml.glioma.predict.predictions_frame)
    (
        re.compile(rf"p_{_CLASS}"),
        "OOF probability of {cls}: temperature-scaled; mean over the MC-dropout passes when run",
    ),
    (
        re.compile(rf"raw_p_{_CLASS}"),
        "probability of {cls} before calibration: softmax of the logits, T = 1, no MC dropout",
    ),
    (
        re.compile(rf"u_{_TASK}"),
        "MC-dropout uncertainty for {task}: std over passes of the predicted class's probability; NaN = no MC",
    ),
    # PSQA labels, complexity, evaluation, champion/challenger
    (
        re.compile(r"gpr_(?P<dose>\d+)_(?P<dta>\d+)"),
        "gamma passing rate (%) at {dose}%/{dta}mm: global, 10 % low-dose cutoff, reference = delivered",
    ),
    (
        re.compile(r"sas_(?P<mm>\d+)"),
        "small aperture score: MU-weighted fraction of open leaf pairs with gap < {mm} mm",
    ),
    (re.compile(rf"MAE {_CRIT}"), "test MAE of the predicted GPR at {crit}, percentage points"),
    (
        re.compile(rf"AUC fail \({_CRIT}\)"),
        "test AUC of -predicted GPR at {crit} for spotting failing plans (measured < 90 %)",
    ),
    (
        re.compile(rf"sens \({_CRIT}\)"),
        "test sensitivity at {crit}: failing plans (measured GPR < 90 %) predicted < 90 %",
    ),
    (
        re.compile(rf"spec \({_CRIT}\)"),
        "test specificity at {crit}: passing plans (measured GPR >= 90 %) predicted >= 90 %",
    ),
    (re.compile(rf"Spearman \({_CRIT}\)"), "test Spearman rank correlation of predicted and measured GPR at {crit}"),
    (
        re.compile(r"(?P<role>challenger|champion)_mae_(?P<dose>\d+)_(?P<dta>\d+)"),
        "{role}'s test-split MAE of the predicted GPR {dose}%/{dta}mm in pp; NaN = no champion",
    ),
    (
        re.compile(r"(?P<role>challenger|champion)_value"),
        "the {role}'s value of `metric` (oof_score or best validation loss); NaN = none",
    ),
    (
        re.compile(r"phi_(?P<mod>image|table)"),
        "Shapley value of the {mod} modality: task error it removes (gpr: MAE pp, dd: L1 % of max); > 0 = helps",
    ),
    (re.compile(rf"n_{_SPLIT}"), "plans in the {split} split of the training pack"),
    (re.compile(_SPLIT), "patients of the contour + dose cache in the {split} split"),
    # geometry (series_index, file_index, volume_manifest)
    (re.compile(r"origin_(?P<axis>[xyz])"), "{axis} of the first voxel's centre in mm (patient LPS); NaN = unknown"),
    (
        re.compile(r"spacing_(?P<axis>[xyz])"),
        "voxel spacing along {axis} in mm (x = columns, y = rows, z = slices); NaN = unknown",
    ),
    (re.compile(r"shape_(?P<axis>[xyz])"), "voxels along {axis} (the array is z, y, x)"),
    (
        re.compile(r"position_(?P<axis>[xyz])"),
        "{axis} of the file's ImagePositionPatient in mm (LPS; NIfTI: volume origin); NaN = none",
    ),
]


def describe_column(name: str) -> str | None:
    """The description of column ``name``: ``COLUMN_DOCS``, else the first pattern that matches the
    whole name (its template filled with the named groups), else None."""
    if name in COLUMN_DOCS:
        return COLUMN_DOCS[name]
    for pattern, template in COLUMN_PATTERNS:
        m = pattern.fullmatch(name)
        if m:
            return template.format(**m.groupdict())
    return None
