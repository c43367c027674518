"""The complete op-rule table, for everything that runs the tracer.

The entries live in :mod:`engine.graph.ops` (core ATen ops) and :mod:`engine.graph.ops_moe`
(mixtures of experts); both register into the one dict ``ops.RULES``. Importing them here,
in this order, is what makes the table complete before the first lookup, so every consumer
looks rules up through this module and never through ``ops`` alone.
"""

from __future__ import annotations

from engine.graph import ops_moe  # noqa: F401 - importing it registers its entries
from engine.graph.ops import RULES, Rule, find_rule, rule_for, unknown_op

__all__ = ["RULES", "Rule", "find_rule", "rule_for", "unknown_op"]
