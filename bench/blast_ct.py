"""BLAST-CT v1 inference time, conv3d efficiency and peak memory on the GE head CT.

Runs on CUDA when torch sees a GPU (all 12 members by default), else on the CPU (members
1 and 2); ``--device`` and ``--members`` choose. In one run: the machine's Conv3d limit
(``bench/conv3d_limit.py``); per member of ``--per-member``, the whole-volume pass of the
prepared path (``pipelines.blast_ct.prepared``, what the pipeline runs) side by side with
the plain module-by-module path (``box_logits`` over boxes of ``PLAIN_BOX``, the path
before the prepared one), each with its time, the multiply-accumulates it executes, GMAC/s, that
as a fraction of the limit, and the largest probability difference between the two
(everywhere, and on the head's voxels, windowed value above -1); then the ensemble of
``--members`` as the pipeline runs it (summed softmax; weights loaded first, apart), with
the Dice / false-positive volume of the IPH segment for a synthetic 20 mL haematoma.
``--before PATH`` (another checkout, e.g. ``git archive main`` unpacked) runs that
checkout's prepared member in a child process right after ours, on the same image, with
the same threads: time, ratio and the largest probability difference from one run.
Peak memory is the process's resident high-water mark (VmHWM) after each step, so it only
grows; each step starts from the previous step's peak.

Run: ``PYTHONPATH=$PWD .venv/bin/python bench/blast_ct.py [--members 1,2] [--per-member 1]
[--no-plain] [--no-tiling] [--no-pipeline] [--before /tmp/main]``; prints JSON. Needs
../shared (the GE head CT and the weights).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import torch

from bench.conv3d_limit import default_device, measure, synchronise
from pipelines.blast_ct import BlastCtParameters, BlastCtPipeline
from pipelines.blast_ct.inference import box_logits, ensemble_sum, reference_logits
from pipelines.blast_ct.network import (
    FACTORS,
    FEATURE_MAPS,
    FULLY_CONNECTED,
    NUM_CLASSES,
    DeepMedic,
)
from pipelines.blast_ct.prepared import (
    BACKGROUND,
    HEAD_VOXELS,
    PATHWAY_DEPTH,
    Footprint,
    PreparedBlock,
    PreparedMember,
    Range,
    aligned,
    boxes,
    cells,
    footprint,
    split,
)
from pipelines.blast_ct.preprocess import radiological, resample_to_1mm, window
from pipelines.blast_ct.weights import load_ensemble, weights_dir
from pipelines.geometry import represented_thickness
from pipelines.synthetic import insert_lesion, write_series
from pipelines.volume import LoadedSeries, load_series

SHARED = Path(__file__).resolve().parents[2] / "shared"
GE_HEADCT = SHARED / "data" / "headct_ge_tilt"
PLAIN_BOX = ((64, 128, 128), (192, 384, 384))  # the plain path's boxes: CPU, CUDA


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
    parser.add_argument("--members", type=numbers, default=None, help="default: by device")
    parser.add_argument("--per-member", type=numbers, default=(1,))
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA if any)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--no-plain", action="store_true", help="skip the plain path")
    parser.add_argument("--no-tiling", action="store_true", help="skip the tiling check")
    parser.add_argument("--no-pipeline", action="store_true", help="skip the ensemble pipeline")
    parser.add_argument(
        "--before", type=Path, default=None, help="another checkout whose member runs beside ours"
    )
    parser.add_argument(
        "--tiling-crop",
        type=numbers,
        default=(60, 120, 120),
        help="central crop (z,y,x) of the 1 mm image on which the reference's tile-by-tile "
        "computation and one whole pass of the same member are timed side by side",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    limit = measure(device, (48, 96, 96), repeats=2)

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
        "conv3d_limit_gmac_s": limit["limit_gmac_s"],
        "conv3d": limit["convolutions"],
        "threads": args.threads,
        "grid": list(volume.hu.shape),
        "grid_1mm": list(image.shape),
        "preprocess_s": round(time.perf_counter() - start, 2),
        "lesion_ml": round(lesion.volume_ml, 2),
    }
    pipeline = BlastCtPipeline(BlastCtParameters(members=args.members, device=device.type))
    plain_box = PLAIN_BOX[device.type == "cuda"]
    per_member = {}
    for index in args.per_member:
        start = time.perf_counter()
        model = load_ensemble([index], device)[0]
        row: dict[str, object] = {"load_s": round(time.perf_counter() - start, 2)}
        paths = {"prepared": lambda m: ensemble_sum([m], image, pipeline.box, device)}
        if not args.no_plain:
            paths["plain"] = lambda m: plain_probabilities(m, image, plain_box, device)
        results = {}
        timings: dict[str, float] = {}
        for name, run in paths.items():
            synchronise(device)
            start = time.perf_counter()
            results[name] = run(model)
            synchronise(device)
            seconds = timings[name] = time.perf_counter() - start
            prepared = name == "prepared"
            macs = (
                prepared_macs(image, pipeline.box, prepared_member(model))
                if prepared
                else plain_macs(image, plain_box)
            )
            row[name] = {
                "inference_s": round(seconds, 1),
                "gmac": round(macs / 1e9),
                "gmac_s": round(macs / seconds / 1e9, 1),
                "fraction_of_limit": round(
                    macs / seconds / 1e9 / float(str(limit["limit_gmac_s"])), 2
                ),
                "peak_rss_mb": round(peak_rss_mb()),
            }
        if "plain" in results:
            difference = np.abs(results["prepared"] - results["plain"])
            head = image > BACKGROUND
            row["speed_up"] = round(timings["plain"] / timings["prepared"], 2)
            row["max_abs_probability_difference"] = float(difference.max())
            row["max_abs_probability_difference_head"] = float(difference[:, head].max())
            row["labels_equal"] = bool(
                np.array_equal(results["prepared"].argmax(0), results["plain"].argmax(0))
            )
        if args.before is not None:
            row["before"] = before_member(
                args.before, image, index, pipeline.box, device, args.threads, results["prepared"]
            )
            row["before"]["prepared_over_before"] = round(  # type: ignore[index]
                timings["prepared"] / float(row["before"]["inference_s"]),  # type: ignore[index]
                3,
            )
        per_member[str(index)] = row
    summary["per_member"] = per_member
    if not args.no_tiling:
        summary["tiling_vs_whole_pass"] = tiling_vs_whole(image, args.tiling_crop, device)
    if not args.no_pipeline:
        summary["ensemble"] = ensemble_row(pipeline, series, datasets, lesion.masks)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")


def ensemble_row(
    pipeline: BlastCtPipeline,
    series: LoadedSeries,
    datasets: Sequence[pydicom.Dataset],
    masks: np.ndarray,
) -> dict[str, object]:
    """The pipeline with its members on the series: time, memory, IPH segment figures."""
    start = time.perf_counter()
    pipeline.check()
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    result = pipeline.run(series)
    elapsed = time.perf_counter() - start
    index_of = {str(ds.SOPInstanceUID): i for i, ds in enumerate(datasets)}
    inserted = masks[[index_of[f.sop_instance_uid] for f in series.frames]]
    iph = result.segments[0].frame_mask
    outside = np.any([s.frame_mask for s in result.segments], axis=0) & ~inserted
    thickness = represented_thickness(series.stack.offsets[:, 0])
    pixel_ml = float(np.prod(series.stack.pixel_spacing)) / 1000.0

    def ml(mask: np.ndarray) -> float:
        """Planimetric volume of a frame mask, mL."""
        return round(float(np.sum(mask.sum(axis=(1, 2)) * thickness)) * pixel_ml, 2)

    return {
        "members": list(pipeline.members),
        "load_s": round(loaded, 1),
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


BEFORE_SCRIPT = """
import sys, time
from pathlib import Path
import numpy as np, torch
from pipelines.blast_ct.inference import ensemble_sum
from pipelines.blast_ct.weights import load_ensemble
image, out, device, threads, index, box, folder = sys.argv[1:8]
torch.set_num_threads(int(threads))
device = torch.device(device)
model = load_ensemble([int(index)], device, Path(folder))[0]
start = time.perf_counter()
p = ensemble_sum([model], np.load(image), tuple(int(v) for v in box.split(",")), device)
if device.type == "cuda":
    torch.cuda.synchronize(device)
seconds = time.perf_counter() - start
try:  # that checkout's count of its multiply-accumulates, where its bench has one
    from bench.blast_ct import executed_macs
    gmac = executed_macs(np.load(image), tuple(int(v) for v in box.split(",")), True) / 1e9
except (ImportError, TypeError):
    gmac = float("nan")
print(seconds, gmac)
np.save(out, p)
"""


def before_member(
    checkout: Path,
    image: np.ndarray,
    index: int,
    box: tuple[int, ...],
    device: torch.device,
    threads: int,
    ours: np.ndarray,
) -> dict[str, object]:
    """Member ``index``'s prepared pass by another checkout's code in a child process:
    its time, and its largest probability difference from ``ours``."""
    with tempfile.TemporaryDirectory() as folder:
        source, out = Path(folder) / "image.npy", Path(folder) / "before.npy"
        np.save(source, image)
        argv = [str(source), str(out), str(device), str(threads), str(index)]
        argv += [",".join(str(v) for v in box), str(weights_dir().resolve())]
        done = subprocess.run(
            [sys.executable, "-c", BEFORE_SCRIPT, *argv],
            cwd=checkout,
            env={"PYTHONPATH": str(checkout.resolve()), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            check=True,
        )
        theirs = np.load(out)
    difference = np.abs(theirs - ours)
    seconds, gmac = (float(v) for v in done.stdout.split()[-2:])
    return {
        "checkout": str(checkout),
        "inference_s": round(seconds, 1),
        "gmac": round(gmac) if math.isfinite(gmac) else None,
        "max_abs_probability_difference": float(difference.max()),
        "labels_equal": bool(np.array_equal(theirs.argmax(0), ours.argmax(0))),
    }


def full_footprint(shape: tuple[int, ...]) -> Footprint:
    """A footprint that skips nothing: every pathway runs everywhere."""
    z, y, x = shape
    coarse = {s: ((0, -(-z // s)), (0, -(-y // s)), (0, -(-x // s))) for s in FACTORS}
    return Footprint((z, y, x), coarse, ((0, z), (0, y), (0, x)))


def plain_probabilities(
    model: torch.nn.Module, image: np.ndarray, box_size: tuple[int, ...], device: torch.device
) -> np.ndarray:
    """One member's softmax (5, z, y, x) by ``box_logits`` over boxes of the whole volume:
    the module-by-module path (default-layout weights, head as matrix products)."""
    volume = torch.from_numpy(np.ascontiguousarray(image))[None, None].to(device)
    total = np.empty((NUM_CLASSES, *image.shape), dtype=np.float32)
    with torch.inference_mode():
        for box in boxes(full_footprint(image.shape), box_size):
            p = torch.softmax(box_logits(model, volume, box), dim=1)  # type: ignore[arg-type]
            total[(slice(None), *(slice(a, b) for a, b in box))] = p[0].cpu().numpy()
    return total


PLAIN_SHAPES = [(a, b) for a, b in itertools.pairwise((1, *FEATURE_MAPS))]
"""(in, out) channels of every block of a pathway, as published."""


def pathway_macs(sizes: list[int], shapes: Sequence[tuple[int, int]] = PLAIN_SHAPES) -> int:
    """Multiply-accumulates of one pathway of blocks with (in, out) channels ``shapes``
    producing coarse output ``sizes`` (z, y, x)."""
    total = 0
    for k, (cin, cout) in enumerate(shapes):
        grow = 2 * (len(shapes) - 1 - k)
        total += math.prod(n + grow for n in sizes) * cin * cout * 27
    return total


HEAD_MACS = sum(
    a * b
    for a, b in zip(
        (FEATURE_MAPS[-1] * len(FACTORS), *FULLY_CONNECTED),
        (*FULLY_CONNECTED, NUM_CLASSES),
        strict=True,
    )
)


def prepared_member(model: DeepMedic) -> PreparedMember:
    """``model`` prepared as the pipeline runs it (for its pruned channel counts)."""
    with torch.inference_mode():
        return PreparedMember(model)


def shapes(blocks: Sequence[PreparedBlock]) -> list[tuple[int, int]]:
    """(in, out) channels of prepared blocks."""
    return [(int(b.weight.shape[1]), int(b.weight.shape[0])) for b in blocks]


def plain_macs(image: np.ndarray, size: tuple[int, ...]) -> int:
    """Multiply-accumulates of ``box_logits`` over boxes of ``size`` tiling the volume:
    per box, each pathway on the coarse voxels the box needs, plus its valid-convolution
    margins, and the head on every voxel of the box."""
    total = 0
    area = full_footprint(image.shape)
    for box in boxes(area, size):
        for s in FACTORS:
            total += pathway_macs([-(-b // s) - a // s for a, b in box])
        total += math.prod(b - a for a, b in box) * HEAD_MACS
    return total


def prepared_macs(image: np.ndarray, size: tuple[int, ...], member: PreparedMember) -> int:
    """Multiply-accumulates of ``PreparedMember.logit_chunks`` on ``image``, with the
    member's pruned channels: the coarse pathways once over their footprints; the factor-1
    pathway streamed along z without recomputed margins, per z chunk of ``size[0]``
    planes over the windows where it varies (in columns of at most ``size[1:]``); the
    head voxel by voxel where the factor-1 output varies, and once per coarse cell of the
    region."""
    area = footprint(image)
    if area.empty:
        return 0
    paths = {s: shapes(blocks) for s, blocks in member.pathways}
    head = sum(cin * cout for cin, cout in shapes(member.head))
    total = sum(pathway_macs([b - a for a, b in area.coarse[s]], paths[s]) for s in FACTORS[:-1])
    (z0, z1), (y0, y1), (x0, x1) = area.region
    rows, cols = (b - a for a, b in aligned(((y0, y1), (x0, x1))))
    step = max(HEAD_VOXELS // (rows * cols), 1)
    total += math.prod(len(cells(a, b, FACTORS[:-1])[0]) for a, b in area.region) * head
    span = area.coarse[1][0]
    started = False
    for za in range(z0, z1, size[0]):
        zb = min(za + size[0], z1)
        first, last = max(za, span[0]), min(zb, span[1])
        window = area.fine_window((first, last)) if last > first else None
        if window is not None:
            for ys, xs in area.fine_windows((first, last)):
                for ry in split(ys, size[1]):
                    for rx in split(xs, size[2]):
                        total += streamed_macs(last - first, ry, rx, started, paths[1])
        started = started or last > first
        for j in range(za, zb, step):
            if window is not None:
                varying = area.fine_varying(((j, min(j + step, zb)), *window))
                total += int(np.count_nonzero(varying)) * head
    return total


def streamed_macs(
    planes: int, rows: Range, cols: Range, carried: bool, shapes: Sequence[tuple[int, int]]
) -> int:
    """Multiply-accumulates of the factor-1 pathway (blocks of (in, out) channels
    ``shapes``) on one z chunk of ``planes`` output planes in a y-x window: each block on
    the window widened by its valid-convolution margin, and along z as well on the
    stream's first chunk (``carried`` false)."""
    total = 0
    for k, (cin, cout) in enumerate(shapes):
        grow = 2 * (PATHWAY_DEPTH - 1 - k)
        size = (planes + (0 if carried else grow), *(b - a + grow for a, b in (rows, cols)))
        total += math.prod(size) * cin * cout * 27
    return total


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
