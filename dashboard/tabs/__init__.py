"""The tab registry: one list of the dashboard's tabs, in the order they are shown.

A tab is a module of this package with a ``render(page: dashboard.page.PageState)``
function; app.py draws the open tab only, importing its module on first use. To add a tab,
write the module and add one `Tab` line to `TABS`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Tab:
    title: str  # shown on the tab
    module: str  # dashboard.tabs.<module>, which defines render(page)
    needs_plan: bool = False  # drawn only while the sidebar's options give a plan

    @property
    def render(self) -> Callable[[Any], None]:
        return importlib.import_module(f"{__name__}.{self.module}").render


TABS: tuple[Tab, ...] = (
    Tab("Scores", "scores", needs_plan=True),
    Tab("Plan", "plan"),
    Tab("Prune & compare", "prune", needs_plan=True),
    Tab("Compare on accuracy", "compare"),
    Tab("Graphs", "graphs"),
    Tab("Blocks", "blocks"),
)
