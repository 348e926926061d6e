"""Validation reports, go/no-go gates and model cards of trained clinfer models."""
