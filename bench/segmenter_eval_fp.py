"""Where the learned segmenter's false positive on a normal head lies: every 3-D connected
component of what the network finds (probability >= a floor, with found pixels in the
cranial cavity) on a normal head, with its
volume, frames, distance to the inner table, HU (as acquired and as the network saw it),
network probability (all over the floor component), and which rule kept or dropped it
(the furthest stage any of its found pixels reached: output, foci, small, band, ramp,
calcification, halo or outside the cavity). Results (generated heads; GE rows are not
committed): bench/segmenter_eval_fp_results.json.

Heads: the real GE head CT (when ../shared is present) and the generated normal heads of
``bench.segmenter_eval`` (5 mm, 1 mm, and rise-rendered 5 mm / 1 mm of held-out seeds).

    python -m bench.segmenter_eval_fp [--version 3.0.0] [--floor 0.3] [--min-ml 0.01]
        [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from numpy.typing import NDArray
from scipy import ndimage

from bench.segmenter_eval import frame_voxel_ml, heads, risen_heads
from pipelines.unet import UNetPipeline
from pipelines.unet.bone import bone_ramps, skull_band
from pipelines.unet.network import predict_probabilities
from pipelines.unet.pipeline import decide, frame_regions, frame_rules, frame_spacing
from pipelines.volume import load_datasets


def components(
    unet: UNetPipeline, hu: NDArray[np.floating], spacing: tuple[float, float, float],
    voxel_ml: NDArray[np.float64], floor: float,
) -> list[dict[str, object]]:  # fmt: skip
    """Per 3-D component of probability >= ``floor`` with found pixels in the cranial
    cavity: where it lies, what it is, and which rule of the deployed pipeline kept or
    dropped it."""
    settings = unet.unet.inference
    rules = frame_rules(hu, spacing, settings)
    probability = predict_probabilities(
        unet.unet.model, unet.unet.config, rules.network_hu, spacing[1:]
    )
    found = probability >= settings.threshold
    allowed = found & rules.allowed & ~rules.calcified
    none = np.zeros(found.shape, dtype=bool)
    skull_mm = rules.skull_mm
    ramps = none if skull_mm is None else bone_ramps(allowed, rules.network_hu, skull_mm)
    band = (
        none
        if skull_mm is None or rules.core is None
        else skull_band(allowed & ~ramps, rules.core, skull_mm)
    )
    classes = decide(rules, found, settings, hu, spacing)
    foci = classes.calcification & ~rules.calcified
    final = np.zeros(found.shape, dtype=bool)
    for region in frame_regions(
        classes.hyperdense, voxel_ml[:, 0, 0], settings.min_volume_ml, settings.connectivity
    ):
        final |= region
    labels, _ = ndimage.label(probability >= floor, structure=np.ones((3, 3, 3), dtype=bool))
    weights = np.broadcast_to(voxel_ml, found.shape)
    out = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        part = labels[box] == i
        above = part & found[box]
        if not (above & rules.allowed[box]).any():
            continue  # outside the cranial cavity (scalp, bone): never kept
        stages = (
            (final, "kept: in the output"),
            (foci, "dropped: thick-frame calcification focus (foci)"),
            (classes.hyperdense, f"dropped: under min_volume_ml {settings.min_volume_ml}"),
            (band, "dropped: skull band (band)"),
            (ramps, "dropped: bone ramp"),
            (found & rules.calcified, "dropped: calcification"),
        )
        verdict = next(
            (name for mask, name in stages if (part & mask[box]).any()),
            "dropped: calcification halo or outside the cavity",
        )
        mm = None if skull_mm is None else skull_mm[box][part]
        values, network, p = hu[box][part], rules.network_hu[box][part], probability[box][part]
        out.append(
            {
                "frames": sorted({int(box[0].start + f) for f in np.nonzero(above)[0]}),
                "volume_ml_above_threshold": round(float(weights[box][above].sum()), 4),
                "volume_ml_kept": round(float(weights[box][part & final[box]].sum()), 4),
                "skull_mm_min": None if mm is None else round(float(mm.min()), 1),
                "skull_mm_mean": None if mm is None else round(float(mm.mean()), 1),
                "hu_mean": round(float(values.mean()), 1),
                "hu_max": round(float(values.max()), 1),
                "network_hu_mean": round(float(network.mean()), 1),
                "p_mean": round(float(p.mean()), 3),
                "p_max": round(float(p.max()), 3),
                "verdict": verdict,
            }
        )
    return sorted(out, key=lambda c: -float(c["volume_ml_above_threshold"]))  # type: ignore[arg-type]


def main(argv: Sequence[str] | None = None) -> int:
    """Break each normal head's found components down and write them as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--version", default="3.0.0")
    parser.add_argument("--floor", type=float, default=0.3, help="component probability floor")
    parser.add_argument("--min-ml", type=float, default=0.01, help="smallest component listed")
    parser.add_argument("--out", type=Path, default=Path("segmenter_eval_fp.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    unet = UNetPipeline(args.version, device="cpu")
    report = []
    for head, make in [*heads(False), *risen_heads(False)]:
        series = load_datasets(make())
        found = components(
            unet, series.frame_hu, frame_spacing(series), frame_voxel_ml(series), args.floor
        )
        listed = [c for c in found if float(c["volume_ml_above_threshold"]) >= args.min_ml]  # type: ignore[arg-type]
        entry = {"head": head, "frames": len(series.frames), "components": listed}
        sys.stdout.write(json.dumps(entry) + "\n")
        sys.stdout.flush()
        report.append(entry)
    args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
