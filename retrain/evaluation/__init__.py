"""Metrics with intervals, model runners (SavedModel, TFLite), evaluate and predict, the HTML report, the model card, likely label errors."""
