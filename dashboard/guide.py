"""What a newcomer reads: the "Start here" steps and the glossary of the page's terms.

The glossary is one dict (one fact in one place); every chart reaches it through
``glossary_popover``.
"""

from __future__ import annotations

import streamlit as st

START_STEPS = (
    ("Pick a model", "in the sidebar: the built-in demo (a digit classifier) or demo-lm (a "
     "small language model) work at once; bring your own as a .pt2 or a Hugging Face folder."),
    ("See the scores", "**Scores** tab: how important every channel is under the sidebar's "
     "options; red channels are the ones the plan removes."),
    ("Compare on accuracy", "**Compare on accuracy** tab: what each option does to the "
     "model's metric at each size; click a point to use it."),
    ("Prune", "**Prune & compare** tab: press **Prune** to build the smaller model and see "
     "size, speed and accuracy before and after."),
    ("Recover", "below the Prune results: win accuracy back from a little calibration data."),
    ("Download", "the pruned model (.pt2; .onnx after **Make model.onnx**), its report.json, "
     "and the history of this session's runs as CSV."),
)

GLOSSARY = {
    "channel": "One output channel of a layer (a conv filter, a linear neuron). Pruning "
    "removes channels; the layers reading them lose the matching inputs.",
    "group": "Channels that must go together: every layer whose channel k is tied to the "
    "others' channel k (a residual add, a normalisation, an attention product). Removing "
    "channel k removes it from every member of the group.",
    "score": "How important a channel is: the criterion's raw value per channel, normalised "
    "by the layer norm and combined over the group's members by the policy.",
    "global cut": "The score below which channels are removed when the ratio is global: all "
    "channels of all groups are ranked together and the lowest ratio share goes. Group "
    "constraints then move a few channels across the cut (see group policy, step rule, "
    "pinned, own ratio).",
    "frozen": "Layers that are never pruned: their channels reach a model output or come "
    "straight from a model input, or an operation the engine cannot follow uses them. The "
    "Plan tab lists each with its reason.",
    "group policy": "A grouped convolution or an attention-head reshape must keep the same "
    "number of channels in each of its blocks (heads): the group policy decides how the "
    "removed count is shared; so a channel under the cut can stay and one above it go.",
    "step rule": "The number of channels kept in a group is rounded to a multiple of the step "
    "size (hardware-friendly sizes), so a group can lose a few more or fewer than the cut "
    "says; a ratio of 0.50 then removes a little more or less than 50% of the channels.",
    "own ratio": "A group's own pruning ratio (Plan tab): that group loses that share of its "
    "channels whatever the global cut; pinned groups lose nothing.",
    "policy": "How a group's member scores are combined: sum, average, or backward (the sum "
    "of the raw scores, normalised once).",
    "layer norm": "How scores of different layers are made comparable before the global "
    "ranking (z-score, divide by the sum, min-max, softmax, or none).",
    "points": "A difference of two percentages, e.g. accuracy 99.3% -> 45.0% is -54.3 points "
    "(not -54.3% of the accuracy).",
    "sensitivity": "The metric when only one group is pruned at one ratio: how much worse "
    "it gets shows which groups can lose channels cheaply.",
}


# The steps' short names, in one line above the tabs (the full text is under "Start here").
START_STRIP = " → ".join(f"**{i}** {title}" for i, (title, _text) in
                         enumerate(START_STEPS, start=1))


# Streamlit leaves 6rem above the page for its header bar; its minimal toolbar (one menu button
# at the top right) needs less, and the tab content then starts higher on a 900 px screen.
TOP_SPACE = "<style>[data-testid='stMainBlockContainer'] {padding-top: 3.5rem;}</style>"


def header() -> None:
    """The page's head in two short lines, so that a 1440x900 screen shows the tab content:
    the name with what the page does and a "Start here" button (the six steps, what to do at
    each), then the steps' names in one line."""
    st.html(TOP_SPACE)
    name, start = st.columns([6, 1], vertical_alignment="center")
    name.markdown("**PruneScope**: see how important every channel of a PyTorch model is, "
                  "choose what to cut, prune, and compare with the original. It opens on a "
                  "built-in demo: every feature works without an upload.")
    with start:
        start_here()
    st.caption("Start here: " + START_STRIP + ".")


def start_here() -> None:
    """The numbered first steps with what to do at each, one click away."""
    with st.popover("Start here", icon=":material/flag:", key="start_here", width="stretch"):
        st.markdown("\n".join(f"{i}. **{title}**: {text}"
                              for i, (title, text) in enumerate(START_STEPS, start=1)))
        st.caption("Terms such as group, global cut, frozen, group policy and step rule are "
                   "explained under **Terms** next to every chart.")


def glossary_markdown(terms: tuple[str, ...] | None = None) -> str:
    names = terms or tuple(GLOSSARY)
    return "\n".join(f"- **{name}**: {GLOSSARY[name]}" for name in names)


def glossary_popover(key: str, terms: tuple[str, ...] | None = None) -> None:
    """A "Terms" button next to a chart that opens the glossary."""
    with st.popover("Terms", icon=":material/menu_book:", key=f"terms_{key}"):
        st.markdown(glossary_markdown(terms))
