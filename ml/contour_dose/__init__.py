"""Contouring + dose prediction (Kim et al. 2024 / CTAN, seed 002) on OpenKBP-format data.

``cache``   compact training cache (int16 CT, bit-packed masks, float16 dose, cropped, compressed)
``models``  2D/2.5D U-Net family and the cross-task attention network (CTAN)
``losses``  dose L1, combo loss (0.3 Dice + 0.7 CE; marginal CE + annotated-only Dice for partial
            labels, optional class weights), Dynamic Weight Average
``slices``  stacked slices with per-patient annotation flags, batches, augmentation, rare-ROI sampling
``train``   one trainer for every variant (AMP, resume, time budget, selection on every validation
            patient, out-of-fold masks for Seq-Automated)
``predict`` volume inference, test-time flips, OpenKBP submission CSVs
``stats``   the seed's evaluation tables (DVH-MAE, paired t-tests with Bonferroni)
``export``  DICOM RT Dose / RT Structure Set / NIfTI exports

Only torch, numpy, pandas and pyarrow are needed for cache/models/losses/train/predict.
"""
