"""Datasets, the feature store and the DataModule."""
