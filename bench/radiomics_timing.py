"""Radiomics extraction time per lesion for each study parameter file, ours vs stock.

On a synthetic 5 mm head CT with one inserted ~15 mL haemorrhage (segmented by the
hyperdense threshold pipeline), times ``pipelines.radiomics.extract`` (cropped around the
ROI) and stock pyradiomics on the whole uncropped volume (``crop=False``, the reference)
for each bundled parameter file; reports both, their ratio, the feature count and the
largest relative difference between the two feature vectors.

Run: ``.venv/bin/python bench/radiomics_timing.py [--runs N] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import radiomics
from numpy.typing import NDArray

from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.radiomics import STUDY_PARAMS, count_features, extract
from pipelines.series import LoadedSeries
from pipelines.synthetic import insert_lesion, synthetic_head_ct
from pipelines.volume import load_datasets


def lesion_case(
    seed: int = 3, radius_mm: float = 15.5, rows: int = 256
) -> tuple[LoadedSeries, NDArray[np.bool_]]:
    """A synthetic head CT with one haemorrhage, and the lesion's mask on the volume grid."""
    datasets = synthetic_head_ct(seed, rows=rows)
    insert_lesion(datasets, center_mm=None, radius_mm=radius_mm, hu=70.0, seed=seed)
    series = load_datasets(datasets)
    labels, _ = HyperdenseThresholdPipeline().segment(series)
    return series, labels == 1


def timed(function: Callable[[], dict[str, float]], runs: int) -> tuple[float, dict[str, float]]:
    """Median wall time of ``runs`` calls and the last result."""
    times = []
    result: dict[str, float] = {}
    for _ in range(runs):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def max_relative_difference(a: dict[str, float], b: dict[str, float]) -> float:
    """Largest |a - b| / max(|b|, 1e-12) over the shared keys."""
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in a.keys() & b.keys())


def main() -> int:
    """Run the benchmark and write a table (and optionally JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--rows", type=int, default=256, help="image matrix (256 or 512)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    radiomics.setVerbosity(logging.ERROR)

    series, mask = lesion_case(rows=args.rows)
    volume = series.volume
    lesion_ml = float(mask.sum()) * volume.voxel_volume_ml
    rows = []
    for name in STUDY_PARAMS:
        run = partial(extract, volume.hu, volume.spacing, mask, name)
        ours_s, ours = timed(run, args.runs)
        stock_s, stock = timed(partial(run, crop=False), args.runs)
        rows.append(
            {
                "params": name,
                "features": len(ours),
                "expected": count_features(name),
                "ours_s": round(ours_s, 2),
                "stock_s": round(stock_s, 2),
                "stock_over_ours": round(stock_s / ours_s, 2),
                "max_rel_diff": max_relative_difference(ours, stock),
                "same_keys": ours.keys() == stock.keys(),
            }
        )
    header = (
        f"volume {volume.hu.shape} at {tuple(round(s, 3) for s in volume.spacing)} mm, "
        f"lesion {lesion_ml:.1f} mL, median of {args.runs} run(s)"
    )
    lines = [header, f"{'params':<16}{'n':>6}{'ours s':>9}{'stock s':>9}{'ratio':>7}  max rel diff"]
    lines += [
        f"{r['params']:<16}{r['features']:>6}{r['ours_s']:>9}{r['stock_s']:>9}"
        f"{r['stock_over_ours']:>7}  {r['max_rel_diff']:.1e}"
        for r in rows
    ]
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"case": header, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
