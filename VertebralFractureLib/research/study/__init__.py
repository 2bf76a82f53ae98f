"""The classification study (``vertebral-fracture study``): seven models, one split, the study's tables and plots.

Cohort layout (the simulation issue's): ``COHORT/<case>/ct.nii.gz`` + ``labels.nii.gz`` (VerSe ids on
the CT's grid) and ``COHORT/labels.csv`` with ``case,label,level,genant_grade,genant_type`` per
vertebra. A vertebra is fractured when ``genant_grade >= 1``; a patient when any vertebra is.

Protocol:

1. Per vertebra: the 32^3 x 2 mm crop (:mod:`.classification`), morphometry
   (:func:`.morphometry.measure_vertebrae`) and radiomics (:mod:`.radiomics_features`, only when a
   model needs it).
2. Split by patient, stratified by patient label: 80 % training, 20 % test (``--test-fraction``); no
   patient is in both (written to ``split.json``). With ``--cv`` every model is also run in a
   patient-level stratified K-fold cross-validation (``--folds``), written to ``cv_table.csv``.
3. Models, all on the same crops and with the same budget (``TrainConfig``: epochs, batch 8,
   class-balanced epochs, AdamW + one-cycle learning rate, left-right flips, shifts, intensity jitter):
   ``customcnn`` (by default fusing the vertebra's morphometry, ``MORPHOMETRY_FEATURES``, before its
   head: ``StudyOptions.fuse_morphometry``), ``mobilenetv3``, ``efficientnet-b1``, ``vgg16``,
   ``resnet50v2`` (image only); ``customcnn-radiomics`` (custom CNN fusing the LASSO-selected radiomics
   features; optional); ``radiomics-lasso`` (L1 selection over log(lambda) with patient-grouped CV
   inside the training set, then logistic regression); ``genant-rule`` (morphometry's probability,
   continuous in the height loss: 0.5 at 20 %, i.e. Genant grade >= 1 is called fractured; partial
   vertebrae, which morphometry does not grade, get 0).
   Decision threshold: per model, maximising Youden's J on its own TRAINING vertebrae' predictions
   (genant-rule: 0.5, i.e. grade >= 1); applied to vertebra and patient probabilities alike (a
   patient is called fractured when any vertebra is); written to ``study.json`` (``thresholds``).
4. Metrics on the test set per patient (``table1.csv``/``table2.csv``; patient probability = max over
   its vertebrae) and per vertebra (``table1_vertebra.csv``/``table2_vertebra.csv``), 95 % bootstrap
   CIs over patients (:mod:`.evaluation`); ROC curves, per-epoch loss/accuracy curves, the LASSO
   figures, ``predictions.csv``, ``selected_features.csv`` and one self-contained ``report.html``.

Modules: :mod:`.data` (models, options, cohort reading, patient split), :mod:`.comparison` (one model on one
split, cross-validation), :mod:`.outputs` (tables, figures, report), :mod:`.run` (:func:`run_study`,
:func:`train_classifier`), :mod:`.cohorts` (simulated cohorts in the study layout).
"""

from VertebralFractureLib.research.study.cohorts import (
    simulate_study_cohort,
    write_phantom_cohort,
    write_real_ct_cohort,
)
from VertebralFractureLib.research.study.comparison import ModelRun, cross_validate, fit_predict, standardise_train
from VertebralFractureLib.research.study.data import (
    ALL_MODELS,
    DEFAULT_MODELS,
    MORPHOMETRY_FEATURES,
    RADIOMICS_MODELS,
    CohortData,
    StudyOptions,
    load_cohort,
    morphometry_features,
    patient_labels,
    read_cohort_table,
    split_patients,
)
from VertebralFractureLib.research.study.outputs import StudyResult
from VertebralFractureLib.research.study.run import default_threads, run_study, train_classifier

__all__ = [
    "ALL_MODELS",
    "DEFAULT_MODELS",
    "MORPHOMETRY_FEATURES",
    "RADIOMICS_MODELS",
    "CohortData",
    "ModelRun",
    "StudyOptions",
    "StudyResult",
    "cross_validate",
    "default_threads",
    "fit_predict",
    "load_cohort",
    "morphometry_features",
    "patient_labels",
    "read_cohort_table",
    "run_study",
    "simulate_study_cohort",
    "split_patients",
    "standardise_train",
    "train_classifier",
    "write_phantom_cohort",
    "write_real_ct_cohort",
]
