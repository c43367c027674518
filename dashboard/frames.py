"""Turn engine plans into the DataFrames the chart builders draw.

Only reads public attributes of the engine's plan objects (``p.groups`` with
``name, layers, normalized, scores, pruned, kept``; ``p.threshold``); no pruning logic here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
import pandas as pd

STAT_COLUMNS = ["order", "group", "subset", "n", "min", "q1", "median", "q3", "max"]


def pruned_mask(group_plan: Any) -> np.ndarray:
    """Boolean mask (one entry per channel) of the channels a group plan removes.

    Accepts ``pruned`` as either an index array or a boolean mask.
    """
    scores = np.asarray(group_plan.scores)
    pruned = np.asarray(group_plan.pruned)
    mask = np.zeros(scores.shape[0], dtype=bool)
    if pruned.dtype == bool and pruned.shape == mask.shape:
        return pruned.copy()
    if pruned.size:
        mask[pruned.astype(np.int64)] = True
    return mask


def _stats(values: np.ndarray) -> dict[str, float]:
    if values.size == 0:
        nan = float("nan")
        return {"min": nan, "q1": nan, "median": nan, "q3": nan, "max": nan}
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return {
        "min": float(values.min()),
        "q1": float(q1),
        "median": float(median),
        "q3": float(q3),
        "max": float(values.max()),
    }


def stats_frame(plan: Any) -> pd.DataFrame:
    """Quartiles of the combined score of every group (all / kept / pruned channels)."""
    rows: list[dict[str, Any]] = []
    for order, gp in enumerate(plan.groups):
        scores = np.asarray(gp.scores, dtype=np.float64)
        mask = pruned_mask(gp)
        for subset, values in (("all", scores), ("kept", scores[~mask]), ("pruned", scores[mask])):
            rows.append(
                {"order": order, "group": gp.name, "subset": subset, "n": int(values.size),
                 **_stats(values)}
            )
    return pd.DataFrame(rows, columns=STAT_COLUMNS)


def detail_frame(group_plan: Any, policy: str) -> pd.DataFrame:
    """Channel-by-channel normalized member scores and the combined score of one group."""
    mask = pruned_mask(group_plan)
    rows: list[dict[str, Any]] = []
    for layer in group_plan.layers:
        values = group_plan.normalized.get(layer)
        if values is None:
            continue
        for channel, value in enumerate(np.asarray(values, dtype=np.float64).ravel()):
            rows.append({"channel": channel, "series": layer, "kind": "member",
                         "score": float(value), "pruned": bool(mask[channel])
                         if channel < mask.size else False})
    for channel, value in enumerate(np.asarray(group_plan.scores, dtype=np.float64)):
        rows.append({"channel": channel, "series": f"combined ({policy})", "kind": "combined",
                     "score": float(value), "pruned": bool(mask[channel])})
    return pd.DataFrame(rows, columns=["channel", "series", "kind", "score", "pruned"])


def norm_stats_frame(plans: Mapping[str, Any]) -> pd.DataFrame:
    """Stats frames of several plans (one per layer norm) stacked with a ``norm`` column."""
    parts = []
    for norm, plan in plans.items():
        frame = stats_frame(plan)
        frame.insert(0, "norm", norm)
        parts.append(frame[frame["subset"] == "all"])
    if not parts:
        return pd.DataFrame(columns=["norm", *STAT_COLUMNS])
    return pd.concat(parts, ignore_index=True)


def prune_count_frame(plans: Mapping[str, Any], by: str,
                      only: Iterable[str] | None = None) -> pd.DataFrame:
    """How many channels each plan prunes per group (``by`` names the variant column)."""
    keep = set(only) if only is not None else None
    rows = []
    for variant, plan in plans.items():
        for order, gp in enumerate(plan.groups):
            if keep is not None and gp.name not in keep:
                continue
            mask = pruned_mask(gp)
            rows.append({by: variant, "order": order, "group": gp.name,
                         "channels": int(mask.size), "pruned": int(mask.sum())})
    return pd.DataFrame(rows, columns=[by, "order", "group", "channels", "pruned"])


def policy_frame(plans: Mapping[str, Any], group: str) -> pd.DataFrame:
    """Combined score of one group under each policy, channel by channel."""
    rows = []
    for policy, plan in plans.items():
        gp = next((g for g in plan.groups if g.name == group), None)
        if gp is None:
            continue
        mask = pruned_mask(gp)
        for channel, value in enumerate(np.asarray(gp.scores, dtype=np.float64)):
            rows.append({"policy": policy, "channel": channel, "score": float(value),
                         "pruned": bool(mask[channel])})
    return pd.DataFrame(rows, columns=["policy", "channel", "score", "pruned"])


def pivot_counts(frame: pd.DataFrame, by: str) -> pd.DataFrame:
    """Prune counts as a table: one row per group (network order), one column per variant."""
    if frame.empty:
        return pd.DataFrame()
    table = frame.pivot_table(index=["order", "group", "channels"], columns=by,
                              values="pruned", aggfunc="first", sort=False)
    table = table.sort_index(level="order").reset_index().drop(columns="order")
    table.columns.name = None
    total = {"group": "total", "channels": int(table["channels"].sum())}
    for variant in frame[by].unique():
        total[variant] = int(table[variant].sum())
    return pd.concat([table, pd.DataFrame([total])], ignore_index=True)


def widths_frame(report: Mapping[str, Any]) -> pd.DataFrame:
    """Channels of every group before and after pruning, from report.json's ``groups``."""
    rows = [{"order": i, "group": g["name"], "before": int(g["channels"]),
             "after": len(g["kept"])} for i, g in enumerate(report.get("groups", []))]
    return pd.DataFrame(rows, columns=["order", "group", "before", "after"])


def history_frame(rows: list[Mapping[str, Any]]) -> pd.DataFrame:
    """The session's run history as a table: one row per run, every column any run has
    (blank where a run lacks it), in the order they first appear."""
    columns = list(dict.fromkeys(k for row in rows for k in row))
    return pd.DataFrame([dict(row) for row in rows], columns=columns)


def history_view(table: pd.DataFrame, defaults: Mapping[str, Any]) -> pd.DataFrame:
    """The run history narrowed to fit a 1440 px page: the options that differ from
    ``defaults`` in one column, sizes as the share kept, the metric and the latency as
    "before → after". The full table (every option and number) is the CSV download."""
    option_names = [k for k in defaults if k in table.columns]

    def options(row: pd.Series) -> str:
        changed = [f"{k}={row[k]}" for k in option_names
                   if pd.notna(row[k]) and str(row[k]) != str(defaults[k])]
        return ", ".join(changed) or "defaults"

    def pair(row: pd.Series, before: str, after: str, fmt: str) -> str:
        if before not in row or after not in row or pd.isna(row[before]) or pd.isna(row[after]):
            return ""
        return f"{row[before]:{fmt}} → {row[after]:{fmt}}"

    view = pd.DataFrame({"run": table["run"]})
    if "model" in table:
        view["model"] = table["model"]
    view["options"] = table.apply(options, axis=1) if len(table) else []
    for column in ("ratio", "channels pruned"):
        if column in table:
            view[column] = table[column]
    for key, label in (("params", "params kept"), ("flops", "FLOPs kept")):
        if f"{key} kept" in table:
            view[label] = table[f"{key} kept"].map(lambda v: "" if pd.isna(v) else f"{v:.0%}")
    if "metric" in table:
        view["metric"] = table["metric"].fillna("")
        view["before → after"] = table.apply(
            lambda r: pair(r, "metric before", "metric after", ".4g"), axis=1)
    if "latency before (ms)" in table:
        view["latency (ms)"] = table.apply(
            lambda r: pair(r, "latency before (ms)", "latency after (ms)", ".3g"), axis=1)
    return view


def cut_crossings(plan: Any) -> tuple[int, int]:
    """How many pruned channels score above the global cut and kept ones below it (the
    group, step and block rules decide those), counted over the groups in the global
    ranking; (0, 0) without a cut."""
    if plan.threshold is None:
        return 0, 0
    above = below = 0
    for gp in plan.groups:
        if getattr(gp, "mode", "global") != "global":
            continue
        scores = np.asarray(gp.scores, dtype=np.float64)
        mask = pruned_mask(gp)
        above += int((scores[mask] > plan.threshold).sum())
        below += int((scores[~mask] < plan.threshold).sum())
    return above, below
