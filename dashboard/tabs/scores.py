"""The Scores tab: every group's combined scores, one group's drill-down, and the same
groups under each layer norm and each policy."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pandas as pd
import streamlit as st

from dashboard import charts, charts_static, frames, sources, state
from dashboard.common import cached_figure, make_plan, short
from dashboard.guide import glossary_popover
from dashboard.page import PageState
from engine.options import LAYER_NORMS, POLICIES, PruningOptions

SCORE_VIEWS = ("Overview", "Compare layer norms", "Compare policies")


def render(page: PageState) -> None:
    model, plan, options, plan_args = page.model, page.plan, page.options, page.plan_args
    view = st.segmented_control("View", SCORE_VIEWS, default=SCORE_VIEWS[0], key="score_view",
                                label_visibility="collapsed") or SCORE_VIEWS[0]
    if view == "Overview":
        scores_overview(model, plan, options)
    elif view == "Compare layer norms":
        compare_norms(model, options, plan_args)
    else:
        compare_policies(model, options, plan_args)


def scores_overview(model: state.LoadedModel, plan: Any, options: PruningOptions) -> None:
    total = sum(int(g.scores.size) for g in plan.groups)
    pruned = sum(int(g.pruned.size) for g in plan.groups)
    c = st.columns(4)
    c[0].metric("Prunable groups", len(plan.groups))
    c[1].metric("Channels", f"{total:,}")
    c[2].metric("Channels to prune", f"{pruned:,}", f"{pruned / max(total, 1):.1%} of them",
                delta_color="off", delta_arrow="off")
    c[3].metric("Global cut", "—" if plan.threshold is None else f"{plan.threshold:.4g}")
    st.markdown(
        f"**Combined normalized score of every group** (criterion `{options.criterion}`, "
        f"layer norm `{options.layer_norm}`, policy `{options.policy}`), in network order. "
        "Boxes span the quartiles, whiskers min–max; green = kept channels, red = pruned, "
        "dashed line = the global cut."
    )
    stats = frames.stats_frame(plan)
    fig = cached_figure("score_overview", stats, plan.threshold)
    st.html(charts_static.SWAP_CSS)
    with st.container(key=charts_static.CONTAINER_KEY):
        # The static copy paints at once (Markdown: no script chunk to wait for); Plotly's
        # chart replaces it once its script has loaded (seconds in a browser's first visit):
        # see dashboard/charts_static.py.
        with st.container(key=charts_static.STATIC_KEY):
            st.markdown(charts_static.static_markdown(stats, plan.threshold))
        st.plotly_chart(fig, key="chart_overview", width="stretch")
    crossing = crossing_note(*frames.cut_crossings(plan), options)
    if crossing:
        st.info(crossing, icon=":material/info:")
    glossary_popover("overview", ("group", "global cut", "frozen", "group policy",
                                  "step rule", "own ratio"))

    st.subheader("Drill down into one group")
    names = [g.name for g in plan.groups]
    labels = {g.name: f"{g.name}  ·  {len(g.layers)} member(s), {g.scores.size} ch"
              for g in plan.groups}
    name = st.selectbox("Group", names, key=f"drill_{short(model.key)}",
                        format_func=labels.get,
                        help="Each member's normalized scores and the combined score, "
                        "channel by channel.")
    gp = plan.group(name) if hasattr(plan, "group") else next(
        g for g in plan.groups if g.name == name)
    st.caption(f"Members: {', '.join(gp.layers)} · pruned {gp.pruned.size} of {gp.scores.size}"
               f" channels ({getattr(gp, 'mode', '')})")
    detail = cached_figure("group_detail", frames.detail_frame(gp, options.policy),
                           plan.threshold if getattr(gp, "mode", "global") == "global"
                           else None)
    st.plotly_chart(detail, key="chart_detail", width="stretch")
    glossary_popover("detail", ("group", "score", "policy", "layer norm", "global cut"))


def crossing_note(above: int, below: int, options: PruningOptions) -> str:
    """Why pruned channels can sit above the global cut (and kept ones below), or ""."""
    if not above and not below:
        return ""
    parts = []
    if above:
        parts.append(f"{above:,} pruned channel(s) score above the global cut")
    if below:
        parts.append(f"{below:,} kept channel(s) below it")
    return (" and ".join(parts) + ". The cut ranks channels one by one; then each group's "
            "rules decide: grouped layers and attention heads lose the same number in every "
            f"block (group policy `{options.group_policy}`), and the step rule rounds every "
            f"group's kept count to a multiple of {options.step_size} (`{options.step_op}`). "
            "See **Terms**.")


def _variant_plans(model, options, plan_args, field_name, values) -> tuple[dict, list[str]]:
    plans: dict[str, Any] = {}
    errors: list[str] = []
    for value in values:
        try:
            plans[value] = make_plan(model, replace(options, **{field_name: value}), **plan_args)
        except Exception as e:
            errors.append(f"{value}: {sources.one_line(e)}")
    return plans, errors


def compare_norms(model: state.LoadedModel, options: PruningOptions, plan_args: dict) -> None:
    st.markdown(
        f"**The same groups under all five layer norms** at ratio {plan_args['ratio']:.2f} "
        f"(criterion `{options.criterion}`, policy `{options.policy}`). Raw scores are reused; "
        "only the normalization changes. The dashed line is each norm's global cut."
    )
    plans, errors = _variant_plans(model, options, plan_args, "layer_norm", LAYER_NORMS)
    for msg in errors:
        st.error(msg)
    if not plans:
        return
    fig = charts.norm_comparison(frames.norm_stats_frame(plans),
                                 {n: p.threshold for n, p in plans.items()})
    st.plotly_chart(fig, key="chart_norms", width="stretch")
    glossary_popover("norms", ("layer norm", "global cut"))
    st.markdown("**What each norm would prune** (channels per group):")
    counts = frames.prune_count_frame(plans, by="norm")
    st.plotly_chart(charts.prune_count_comparison(counts, by="norm"), key="chart_norm_counts",
                    width="stretch")
    st.dataframe(frames.pivot_counts(counts, by="norm"), hide_index=True, width="stretch")


def compare_policies(model: state.LoadedModel, options: PruningOptions,
                     plan_args: dict) -> None:
    connected = [g.name for g in model.analysis.groups if len(g.layers) > 1]
    if not connected:
        st.info("This model has no connected groups (groups with more than one member): "
                "the three policies agree on every group.")
        return
    st.markdown(
        f"**Connected groups under each policy** at ratio {plan_args['ratio']:.2f} "
        f"(layer norm `{options.layer_norm}`). `sum` inflates groups with many members, "
        "`average` keeps them comparable with single layers, `backward` scores the "
        "post-residual feature map."
    )
    plans, errors = _variant_plans(model, options, plan_args, "policy", POLICIES)
    for msg in errors:
        st.error(msg)
    if not plans:
        return
    name = st.selectbox("Connected group", connected, key=f"policy_group_{short(model.key)}")
    fig = charts.policy_comparison(frames.policy_frame(plans, name),
                                   {p: plan.threshold for p, plan in plans.items()})
    st.plotly_chart(fig, key="chart_policies", width="stretch")
    glossary_popover("policies", ("policy", "group", "global cut"))
    counts = frames.prune_count_frame(plans, by="policy")
    st.markdown("**What each policy would prune** (all groups; connected groups first):")
    table = frames.pivot_counts(counts, by="policy")
    if not table.empty:
        is_connected = table["group"].isin(connected)
        table = pd.concat([table[is_connected], table[~is_connected]], ignore_index=True)
    st.dataframe(table, hide_index=True, width="stretch")

