"""Scoring and planning: raw channel scores (criteria), layer norms and policies (the spec),
and the plan of which channels each group keeps; `analysis.py` caches one model's scores."""
