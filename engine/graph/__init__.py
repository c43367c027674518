"""Graph capture and analysis: load a model safely, capture its ATen graph, and find the
groups of channels that must be pruned together (op rules in `ops.py`)."""
