"""Transforming the model: remove the planned channels for real (and mask mode)."""
