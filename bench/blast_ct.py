"""BLAST-CT v1 inference time and peak memory on the GE head CT (CPU unless told).

Per member: the whole-volume forward pass of that member alone (hash check and loading
excluded, reported apart). Ensemble: ``--members`` run together as the pipeline does
(summed softmax). Also the pre- and post-processing time of the pipeline around them, and
the Dice / false-positive volume of the IPH segment for a synthetic 20 mL haematoma.
Peak memory is the process's resident high-water mark (VmHWM) after each step, so it only
grows; each step starts from the previous step's peak.

Run: ``.venv/bin/python bench/blast_ct.py [--members 1,2] [--per-member 1,2,3]``;
prints JSON. Needs ../shared (the GE head CT and the weights).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
import torch

from pipelines.blast_ct import BlastCtParameters, BlastCtPipeline
from pipelines.blast_ct.inference import box_logits, ensemble_sum, reference_logits
from pipelines.blast_ct.preprocess import radiological, resample_to_1mm, window
from pipelines.blast_ct.weights import load_ensemble
from pipelines.geometry import represented_thickness
from pipelines.synthetic import insert_lesion, write_series
from pipelines.volume import load_series

SHARED = Path(__file__).resolve().parents[2] / "shared"
GE_HEADCT = SHARED / "data" / "headct_ge_tilt"


def peak_rss_mb() -> float:
    """Resident memory high-water mark of this process, MiB (Linux VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def numbers(text: str) -> tuple[int, ...]:
    """A comma-separated list of member numbers."""
    return tuple(int(v) for v in text.split(",") if v)


def main() -> None:
    """Measure and print a JSON summary."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=numbers, default=(1, 2))
    parser.add_argument("--per-member", type=numbers, default=(1,))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--tiling-crop",
        type=numbers,
        default=(60, 120, 120),
        help="central crop (z,y,x) of the 1 mm image on which the reference's tile-by-tile "
        "computation and one whole pass of the same member are timed side by side",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    datasets = [pydicom.dcmread(p) for p in sorted(GE_HEADCT.glob("*.dcm"))]
    radius = (3.0 * 20.0 * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    lesion = insert_lesion(datasets, center_mm=None, radius_mm=radius, hu=70.0, seed=1)
    with tempfile.TemporaryDirectory() as folder:
        series = load_series(write_series(datasets, Path(folder)))
    volume = series.volume
    orient = radiological(volume.affine)
    hu = np.asarray(orient.apply(volume.hu), dtype=np.float32)
    spacing = orient.spacing(volume.spacing)
    start = time.perf_counter()
    image = window(resample_to_1mm(hu, spacing))
    summary: dict[str, object] = {
        "device": str(device),
        "threads": args.threads,
        "grid": list(volume.hu.shape),
        "grid_1mm": list(image.shape),
        "preprocess_s": round(time.perf_counter() - start, 2),
        "lesion_ml": round(lesion.volume_ml, 2),
    }
    pipeline = BlastCtPipeline(BlastCtParameters(members=args.members, device=args.device))
    per_member = {}
    for index in args.per_member:
        start = time.perf_counter()
        model = load_ensemble([index], device)
        loaded = time.perf_counter() - start
        start = time.perf_counter()
        ensemble_sum([model[0]], image, pipeline.box, device)
        per_member[str(index)] = {
            "load_s": round(loaded, 2),
            "inference_s": round(time.perf_counter() - start, 1),
            "peak_rss_mb": round(peak_rss_mb()),
        }
    summary["per_member"] = per_member
    summary["tiling_vs_whole_pass"] = tiling_vs_whole(image, args.tiling_crop, device)
    start = time.perf_counter()
    result = pipeline.run(series)
    elapsed = time.perf_counter() - start
    index_of = {str(ds.SOPInstanceUID): i for i, ds in enumerate(datasets)}
    inserted = lesion.masks[[index_of[f.sop_instance_uid] for f in series.frames]]
    iph = result.segments[0].frame_mask
    outside = np.any([s.frame_mask for s in result.segments], axis=0) & ~inserted
    thickness = represented_thickness(series.stack.offsets[:, 0])
    pixel_ml = float(np.prod(series.stack.pixel_spacing)) / 1000.0

    def ml(mask: np.ndarray) -> float:
        """Planimetric volume of a frame mask, mL."""
        return round(float(np.sum(mask.sum(axis=(1, 2)) * thickness)) * pixel_ml, 2)

    summary["ensemble"] = {
        "members": list(args.members),
        "pipeline_s": round(elapsed, 1),
        "peak_rss_mb": round(peak_rss_mb()),
        "iph_dice": round(2.0 * np.count_nonzero(iph & inserted) / (iph.sum() + inserted.sum()), 3),
        "iph_ml": ml(iph),
        "false_positive_ml_iph": ml(iph & ~inserted),
        "false_positive_ml_all_classes": ml(outside),
        "segments_ml": {
            s.segment.label: round(s.total.volume_ml, 2) if s.total else 0.0
            for s in result.segments
        },
    }
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")


def tiling_vs_whole(
    image: np.ndarray, crop: tuple[int, ...], device: torch.device
) -> dict[str, object]:
    """Member 1 on a central crop: the reference's 110^3 tiles vs one whole pass."""
    starts = [max((n - c) // 2, 0) for n, c in zip(image.shape, crop, strict=True)]
    region = tuple(slice(a, a + c) for a, c in zip(starts, crop, strict=True))
    tensor = torch.from_numpy(np.ascontiguousarray(image[region]))[None, None].to(device)
    model = load_ensemble([1], device)[0]
    with torch.no_grad():
        start = time.perf_counter()
        tiled = reference_logits(model, tensor)
        tiled_s = time.perf_counter() - start
        start = time.perf_counter()
        z, y, x = (int(n) for n in tensor.shape[2:])
        whole = box_logits(model, tensor, ((0, z), (0, y), (0, x)))
        whole_s = time.perf_counter() - start
    return {
        "crop": list(tensor.shape[2:]),
        "reference_tiles_s": round(tiled_s, 1),
        "whole_pass_s": round(whole_s, 1),
        "speed_up": round(tiled_s / whole_s, 2),
        "max_abs_logit_difference": float((tiled - whole).abs().max()),
    }


if __name__ == "__main__":
    main()
