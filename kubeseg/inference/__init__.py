"""Prediction: trained folds → segmentations of new images (nnU-Net v2's predictor, batched).

Modules, one job each: :mod:`safe_load` (checkpoints as data), :mod:`model` (a trained-model
folder), :mod:`sliding_window` (tiles, Gaussian weights, mirroring), :mod:`predictor` (one
configuration: preprocessing, folds, cascade), :mod:`export` (back to the input grid),
:mod:`run` (files and folders, ensembles, postprocessing; ``kubeseg predict``).
"""

from kubeseg.inference.predictor import PredictSettings, Predictor
from kubeseg.inference.run import predict

__all__ = ["PredictSettings", "Predictor", "predict"]
