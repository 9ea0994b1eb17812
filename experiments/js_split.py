"""Split each targeted field's JS distance into the mass off the target and the shape on it.

Reads the ``report.json`` of ``prunescope edit`` runs and prints, for each kind and strength,
on the training template and on the held-out rewordings (mean over them) per targeted field of
row 1: the JS distance to the target, the share of the distribution on values the target
excludes (``off``; that share alone, the rest exactly on target, reads about ``sqrt(off / 2)``),
and the JS distance of the distribution with those values left out and renormalised
(``shape``). Distances add roughly in quadrature: JS^2 ~ off / 2 + shape^2. No model is loaded::

    .venv/bin/python experiments/js_split.py runs/edit-gated-hold-90-t48 runs/edit-gated-hold-150-t48
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from prunescope.edit.targets import parse_targets
from prunescope.probe.stats import js_distance
from prunescope.probe.template import load_template


def split(distribution: list[float], target: np.ndarray) -> tuple[float, float, float]:
    """(JS distance, off-target share, JS distance of the on-target part renormalised)."""
    p = np.asarray(distribution, dtype=np.float64)  # [values]
    p = p / p.sum()
    on = target > 0
    off = float(p[~on].sum())
    shape = js_distance(np.where(on, p, 0.0), target) if off < 1 else 1.0
    return js_distance(p, target), off, shape


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="folders written by prunescope edit --out")
    args = parser.parse_args()
    for run in args.runs:
        report = json.loads((run / "report.json").read_text())
        targets = parse_targets(report["targets"], load_template(report["template"]))
        for result in report["results"]:
            print(f"{run}: {result['kind']} x{result['strength']:.3g}")
            for t in targets:
                label = f"row 1 / {t.key.label}"
                for name, keys in (("training", [label]),
                                   ("held-out", [f"{h} / {label}" for h in report["heldout_templates"]])):
                    got = np.array([split(result["fields"][k]["distribution"], t.as_array())
                                    for k in keys if k in result["fields"]])  # [templates, 3]
                    if len(got):
                        js, off, shape = got.mean(0)
                        print(f"  {t.key.label:<12} {name:<8} JS {js:.3f}  off {off:.4f} "
                              f"(alone {np.sqrt(off / 2):.3f})  shape {shape:.3f}")


if __name__ == "__main__":
    main()
