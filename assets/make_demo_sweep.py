"""Precompute the demo's sweep and sensitivity curves for the dashboard's "Compare on accuracy"
view, so the demo opens with them ready: `python assets/make_demo_sweep.py` writes
assets/demo_sweep.json and assets/demo_sensitivity.json (tests/test_demo_sweep.py checks that
stored points equal a fresh sweep). The sensitivity curves are measured on the calibration
split (assets/demo_calib.npz), never on the evaluation set."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

DEMO_GRID = {"layer_norm": "all", "policy": "all", "criterion": "l2,gm",
             "group_policy": "average,none"}
DEMO_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)


def main() -> None:
    from engine.quality.evaluate import load_calibration_data
    from engine.quality.sensitivity import sensitivity
    from engine.quality.sweep import sweep

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent))
    parser.add_argument("--workers", type=int, default=None)
    args = parser.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    report = sweep("demo", DEMO_GRID, DEMO_RATIOS, eval_data="demo", workers=args.workers,
                   out_json=out / "demo_sweep.json")
    print(f"sweep: {len(report['points'])} points in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    # measured on the calibration split: the dashboard's auto ratios are chosen from these
    # curves and then judged on the held-out evaluation set
    sensitivity("demo", {}, eval_data=load_calibration_data("demo"), workers=args.workers,
                out_json=out / "demo_sensitivity.json")
    print(f"sensitivity in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
