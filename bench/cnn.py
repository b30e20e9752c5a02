"""CNN feature time per case on the CPU, for each backbone, one thread and torch's default.

Per case: input preparation from 512 x 512 frames (crop, window, resize to 224) and the
pooled features, for the 2.5-D input (one sample, frames n-2, n, n+2) and for the largest
slice with the slices +-3 (seven samples); and Grad-CAM on the key sample. Weights are
random (the time does not depend on them). Median of ``--repeats`` runs after a warm-up.

Run: ``.venv/bin/python bench/cnn.py [--backbones resnet50 ...] [--repeats 3]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch
from numpy.typing import NDArray

from pipelines.cnn import (
    SLICES_AROUND_LARGEST,
    TWO_POINT_FIVE_D,
    BackboneName,
    CnnClassifier,
    InputConfig,
    build_classifier,
    case_features,
    grad_cam,
    prepare_frames,
)


def synthetic_case() -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
    """28 frames of 512 x 512 brain-like noise with a 30 mm haematoma over 5 frames."""
    rng = np.random.default_rng(0)
    hu = rng.normal(35.0, 5.0, size=(28, 512, 512)).astype(np.float32)
    yy, xx = np.mgrid[:512, :512]
    mask = np.zeros(hu.shape, dtype=bool)
    for frame, radius in {12: 20, 13: 32, 14: 42, 15: 30, 16: 15}.items():
        mask[frame] = (yy - 240) ** 2 + (xx - 300) ** 2 <= radius**2
    hu[mask] = 70.0
    return hu, mask


def median_seconds(run: Callable[[], object], repeats: int) -> float:
    """Median wall time of ``run`` over ``repeats`` calls, after one warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_backbone(
    model: CnnClassifier, hu: NDArray[np.float32], mask: NDArray[np.bool_], repeats: int
) -> dict[str, float]:
    """Seconds per case for each input variant and for Grad-CAM."""
    spacing = (0.45, 0.45)
    out = {}
    for label, config in (("2.5d", TWO_POINT_FIVE_D), ("slices_pm3", SLICES_AROUND_LARGEST)):

        def features(config: InputConfig = config) -> object:
            return case_features(model, [prepare_frames(hu, mask, spacing, config)])

        out[f"{label}_s"] = round(median_seconds(features, repeats), 3)
    case = prepare_frames(hu, mask, spacing, TWO_POINT_FIVE_D)
    out["gradcam_s"] = round(median_seconds(lambda: grad_cam(model, case), repeats), 3)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write the results as JSON to standard output."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbones", nargs="+", default=[b.value for b in BackboneName])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    default_threads = torch.get_num_threads()
    hu, mask = synthetic_case()
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name in args.backbones:
        model = build_classifier(name)
        results[name] = {}
        for threads in sorted({1, default_threads}):
            torch.set_num_threads(threads)
            results[name][f"threads_{threads}"] = bench_backbone(model, hu, mask, args.repeats)
        torch.set_num_threads(default_threads)
    report = {"device": "cpu", "torch": torch.__version__, "results": results}
    sys.stdout.write(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
