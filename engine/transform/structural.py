"""Structural passes that run before width pruning: whole experts, then whole blocks.

Each pass removes its structures, verifies the smaller model against its own mask mode and
re-captures it; width pruning then plans on what remains. The report gets one section per
pass ("experts", "blocks" with "depth"), and "before" describes the original model.
"""

from __future__ import annotations

from typing import Any

from engine.errors import OptionError
from engine.options import check_ratio
from engine.transform.depth import blocks_to_remove, check_block_unit, prune_depth
from engine.transform.experts import prune_experts


def wanted(expert_ratio: Any, block_ratio: Any, remove_blocks: Any,
           block_unit: Any = "block") -> bool:
    """Whether any structural pass is asked for (values are checked here, before capture)."""
    check_block_unit(block_unit)
    if expert_ratio is not None:
        check_ratio(expert_ratio, "--expert-ratio")
    if block_ratio is not None:
        check_ratio(block_ratio, "--block-ratio")
    if block_ratio is not None and remove_blocks is not None:
        raise OptionError("give --block-ratio R or --remove-blocks N, not both")
    if remove_blocks is not None:
        blocks_to_remove(1 << 30, None, remove_blocks)  # integer >= 0; the count comes later
    return any(v is not None for v in (expert_ratio, block_ratio, remove_blocks))


def remove_structures(
    analysis, *, expert_ratio: Any = None, block_ratio: Any = None, remove_blocks: Any = None,
    calibration: Any = None, progress=None, block_unit: str = "block",
) -> tuple[Any, dict[str, Any]]:
    """(the Analysis of the smaller model, report sections)."""
    say = progress or (lambda _msg: None)
    sections: dict[str, Any] = {}
    if expert_ratio is not None:
        say("removing experts")
        analysis, sections["experts"] = prune_experts(analysis, expert_ratio, calibration)
    if block_ratio is not None or remove_blocks is not None:
        say("removing layers" if block_unit == "layer" else "removing blocks")
        analysis, depth = prune_depth(analysis, block_ratio=block_ratio,
                                      remove_blocks=remove_blocks, calibration=calibration,
                                      block_unit=block_unit)
        sections["blocks"] = depth.pop("blocks")
        sections["depth"] = depth
    return analysis, sections
