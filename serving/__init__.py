"""Serving exported models: a BentoML service, an offline predictor and a Python API, none of them with torch.

- `serving.Classifier` (serving/classifier.py): load an exported model, classify images in Python.
- `python -m serving.predict`: classify files and folders, or score a labelled tree, from the command line.
- `bentoml serve` (serving/service.py): the HTTP service with adaptive batching.
- `python -m serving.model_store import FOLDER`: put an exported model into BentoML's model store.
"""

from serving.classifier import Classifier, Prediction

__all__ = ["Classifier", "Prediction"]
