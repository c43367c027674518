"""Each extension point is one table that every consumer reads: the criteria and the recovery
methods (engine/options.py), scored and run by functions registered under the same names;
the CLI help and the dashboard show the table's help, not a copy."""

from __future__ import annotations

import contextlib
import io

import torch

from dashboard.recover_run import DEFAULT_METHODS, METHOD_CHOICES
from dashboard.sidebar import HELP
from engine.cli import main
from engine.graph.rules import RULES
from engine.graph.tracer import LAYER_OPS
from engine.graph.weighted import WEIGHTED_OPS
from engine.options import CRITERIA, CRITERION_TABLE, RECOVERY_TABLE, PruningOptions
from engine.quality.metrics import count_flops, graph_flops
from engine.quality.recovery import ALLOWED, CORRECTIONS, DATA_LIGHT
from engine.scoring.analysis import SCORERS


def _help(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main(list(argv))
    return " ".join(out.getvalue().split())  # argparse wraps lines


def test_every_criterion_has_one_scorer():
    # "index" removes the channels the user names; its charts show l2's scores
    assert set(SCORERS) == set(CRITERIA) - {"index"}
    for c in CRITERION_TABLE:
        PruningOptions(criterion=c.name)  # every table entry is an allowed option value


def test_cli_and_dashboard_show_the_criterion_table():
    text = _help("prune", "--help")
    sidebar = HELP["criterion"]
    for c in CRITERION_TABLE:
        assert f"{c.name} = {' '.join(c.help.split())}" in text
        assert f"{c.name} = {c.help}" in sidebar
    needing = [c.name for c in CRITERION_TABLE if c.needs_data]
    assert f"{', '.join(needing)} need --calibration" in text


def test_every_recovery_method_is_run_and_shown():
    names = [m.name for m in RECOVERY_TABLE]
    assert set(CORRECTIONS) == set(DATA_LIGHT) == {m.name for m in RECOVERY_TABLE
                                                   if m.data_light}
    assert ALLOWED == (*names, "auto")
    assert METHOD_CHOICES == tuple(names)
    assert DEFAULT_METHODS == DATA_LIGHT
    text = _help("prune", "--help")
    for m in RECOVERY_TABLE:
        assert f"{m.name} = {' '.join(m.help.split())}" in text


def test_every_weighted_op_has_an_op_rule_and_is_counted():
    for name in WEIGHTED_OPS:
        assert f"aten.{name}" in RULES, name
    assert LAYER_OPS <= set(WEIGHTED_OPS)
    # the FLOPs count reads the same table: a transposed convolution counts as torch's does
    model = torch.nn.Sequential(torch.nn.ConvTranspose2d(3, 4, 3), torch.nn.Linear(6, 5))
    x = torch.randn(1, 3, 4, 4)
    gm = torch.export.export(model, (x,)).module()
    assert graph_flops(gm) == count_flops(model, (x,)) > 0
