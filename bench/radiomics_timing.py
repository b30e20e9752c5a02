"""Radiomics extraction time and memory per lesion for each study parameter file, ours vs stock.

On a synthetic 5 mm head CT with one inserted ~15 mL haemorrhage (segmented by the
hyperdense threshold pipeline), times ``pipelines.radiomics.extract`` (crop around the ROI,
derived images in the worker pool, shared discretisation), the same in this process only
(``workers=1``) and stock pyradiomics on the whole volume (``crop=False``: pyradiomics'
``execute`` on the uncropped image and mask) for each bundled parameter file, in one run,
alternating, with the caches keyed by the ROI box's shape emptied before each (in this
process; pool workers keep theirs). Reports the median of ``--runs`` runs of each (wall
time, and CPU time of this process and its worker processes), ours / stock, the feature
count and the largest relative difference between ours and stock over all features. The
first pooled call (for the first file it starts the pool's processes) is reported on its
own, and the range of the runs' in-process / stock ratios (each run against the stock run
beside it). The parameter files are parsed once before timing, for both, and the compiled
kernels (``pipelines.radiomics.kernels``) loaded into this process once before timing
(reported: a node pays it on its first job after a start).

``--memory`` adds the peak memory of one extraction on a generated 300-slice 512 x 512
series (0.5 mm slices, inserted lesion), ours vs stock, each in a fresh process: the
highest resident memory of that process and its worker processes while extracting, less
what they held before.

Run: ``.venv/bin/python bench/radiomics_timing.py [--runs 3] [--memory] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import os
import statistics
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import radiomics
from numpy.typing import NDArray

from pipelines.hyperdense import HyperdenseThresholdPipeline
from pipelines.radiomics import STUDY_PARAMS, count_features, extract, log
from pipelines.radiomics.kernels import compile_kernels
from pipelines.series import LoadedSeries
from pipelines.synthetic import insert_lesion, synthetic_head_ct
from pipelines.volume import load_datasets

PAGE = os.sysconf("SC_PAGE_SIZE")
TICKS = os.sysconf("SC_CLK_TCK")


def lesion_case(
    seed: int = 3, radius_mm: float = 15.5, rows: int = 256
) -> tuple[LoadedSeries, NDArray[np.bool_]]:
    """A synthetic head CT with one haemorrhage, and the lesion's mask on the volume grid."""
    datasets = synthetic_head_ct(seed, rows=rows)
    insert_lesion(datasets, center_mm=None, radius_mm=radius_mm, hu=70.0, seed=seed)
    series = load_datasets(datasets)
    labels, _ = HyperdenseThresholdPipeline().segment(series)
    return series, labels == 1


def forget_box_shapes() -> None:
    """Empty this process's cache keyed by the ROI box's shape (LoG matrices), as a new
    lesion finds it; pool workers keep theirs."""
    log._matrix.cache_clear()


def timed(
    function: Callable[[], dict[str, float]],
) -> tuple[float, float, dict[str, float]]:
    """Wall time and CPU time (this process and its worker processes) of one call, and
    its result."""
    cpu = _family_cpu_s()
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, _family_cpu_s() - cpu, result


def max_relative_difference(a: dict[str, float], b: dict[str, float]) -> float:
    """Largest |a - b| / max(|b|, 1e-12) over the shared keys."""
    return max(abs(a[k] - b[k]) / max(abs(b[k]), 1e-12) for k in a.keys() & b.keys())


def timing_rows(
    series: LoadedSeries, mask: NDArray[np.bool_], runs: int
) -> list[dict[str, object]]:
    """Per study file: ours (pooled and in-process) and stock, ``runs`` runs each."""
    volume = series.volume
    rows = []
    for name in STUDY_PARAMS:
        run = partial(extract, volume.hu, volume.spacing, mask, name)
        count_features(name)  # parses (and caches) the file outside the timings
        first_s, _, _ = timed(partial(run, workers=2))  # the first includes starting the pool
        times: dict[str, list[float]] = {"ours": [], "single": [], "stock": []}
        cpu: dict[str, list[float]] = {"ours": [], "single": [], "stock": []}
        results: dict[str, dict[str, float]] = {}
        for _ in range(runs):
            for key, call in (
                ("ours", partial(run, workers=2)),
                ("single", partial(run, workers=1)),
                ("stock", partial(run, crop=False)),
            ):
                forget_box_shapes()  # each lesion has a box of its own: no cached walks
                seconds, cpu_s, results[key] = timed(call)
                times[key].append(seconds)
                cpu[key].append(cpu_s)
        median = {k: statistics.median(v) for k, v in times.items()}
        per_run = [round(a / b, 3) for a, b in zip(times["single"], times["stock"], strict=True)]
        median_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        rows.append(
            {
                "params": name,
                "features": len(results["ours"]),
                "expected": count_features(name),
                "same_keys": results["ours"].keys() == results["stock"].keys(),
                "first_s": round(first_s, 3),
                "ours_s": round(median["ours"], 3),
                "single_s": round(median["single"], 3),
                "stock_s": round(median["stock"], 3),
                "ours_over_stock": round(median["ours"] / median["stock"], 3),
                "single_over_stock": round(median["single"] / median["stock"], 3),
                "ours_cpu_s": round(median_cpu["ours"], 3),
                "single_cpu_s": round(median_cpu["single"], 3),
                "stock_cpu_s": round(median_cpu["stock"], 3),
                "cpu_ours_over_stock": round(median_cpu["ours"] / median_cpu["stock"], 3),
                "cpu_single_over_stock": round(median_cpu["single"] / median_cpu["stock"], 3),
                "single_over_stock_runs": per_run,  # each run against its own stock run
                "single_over_stock_range": f"{min(per_run)}-{max(per_run)}",
                "max_rel_diff": max_relative_difference(results["ours"], results["stock"]),
                "max_rel_diff_single": max_relative_difference(results["single"], results["stock"]),
            }
        )
    return rows


def _family(pid: int | None = None) -> list[int]:
    """A process (this one) and all its descendants (the pool, its forkserver)."""
    pid = os.getpid() if pid is None else pid
    out = [pid]
    try:
        threads = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for thread in threads:
        try:
            with open(f"/proc/{pid}/task/{thread}/children") as handle:
                children = [int(child) for child in handle.read().split()]
        except FileNotFoundError:
            continue
        for child in children:
            out += _family(child)
    return out


def _proc_field(pid: int, read: Callable[[str], int]) -> int:
    """``read`` of a /proc/<pid> file's text; 0 once the process is gone."""
    try:
        with open(f"/proc/{pid}/" + ("statm" if read is _rss else "stat")) as handle:
            return read(handle.read())
    except (FileNotFoundError, ProcessLookupError):
        return 0


def _rss(statm: str) -> int:
    return int(statm.split()[1]) * PAGE


def _cpu_ticks(stat: str) -> int:
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _family_bytes() -> int:
    """Resident memory of this process and its descendants."""
    return sum(_proc_field(pid, _rss) for pid in _family())


def _family_cpu_s() -> float:
    """CPU seconds used so far by this process and its live descendants."""
    return sum(_proc_field(pid, _cpu_ticks) for pid in _family()) / TICKS


def _peak_extra_bytes(function: Callable[[], object]) -> int:
    """Highest family resident memory while ``function`` runs, less that before it."""
    before = _family_bytes()
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _family_bytes())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        function()
    finally:
        done.set()
        sampler.join()
    return max(peak, _family_bytes()) - before


def _memory_child(crop: bool, params: str, slices: int) -> int:
    """Peak extra memory of one extraction on the large generated series (in a fresh process)."""
    radiomics.setVerbosity(logging.ERROR)
    datasets = synthetic_head_ct(5, n_slices=slices, slice_thickness_mm=0.5, rows=512)
    lesion = insert_lesion(datasets, center_mm=None, radius_mm=15.5, hu=70.0, seed=5)
    series = load_datasets(datasets)
    del datasets
    volume = series.volume
    if crop:  # start the pool's processes on a small case first: they are not the extraction
        small = np.zeros((16, 32, 32), np.float32)
        roi = np.zeros(small.shape, bool)
        roi[4:12, 8:24, 8:24] = True
        extract(small, (1.0, 1.0, 1.0), roi, params)
    return _peak_extra_bytes(
        partial(extract, volume.hu, volume.spacing, lesion.masks, params, crop=crop)
    )


def memory_rows(params: str, slices: int) -> dict[str, object]:
    """Peak extra memory of ours and stock on the large series, each in a fresh process."""
    context = multiprocessing.get_context("spawn")
    out: dict[str, object] = {"params": params, "slices": slices}
    for key, crop in (("ours", True), ("stock", False)):
        with ProcessPoolExecutor(1, mp_context=context) as pool:
            extra = pool.submit(_memory_child, crop, params, slices).result()
        out[f"{key}_mib"] = round(extra / 2**20)
    return out


def main() -> int:
    """Run the benchmark and write a table (and optionally JSON)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3, help="0: memory only")
    parser.add_argument("--rows", type=int, default=256, help="image matrix (256 or 512)")
    parser.add_argument("--memory", action="store_true", help="peak memory on 300 slices")
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    radiomics.setVerbosity(logging.ERROR)

    series, mask = lesion_case(rows=args.rows)
    volume = series.volume
    start = time.perf_counter()
    compile_kernels()  # once per process (from numba's disk cache): reported, not timed per run
    kernels_s = time.perf_counter() - start
    lesion_ml = float(mask.sum()) * volume.voxel_volume_ml
    rows = timing_rows(series, mask, args.runs) if args.runs > 0 else []
    header = (
        f"volume {volume.hu.shape} at {tuple(round(s, 3) for s in volume.spacing)} mm, "
        f"lesion {lesion_ml:.1f} mL, median of {args.runs} run(s), {os.cpu_count()} cores, "
        f"load average {os.getloadavg()[0]:.1f}; compiled kernels loaded in {kernels_s:.2f} s"
    )
    lines = [
        header,
        f"{'params':<16}{'n':>6}{'first s':>9}{'ours s':>9}{'1-proc s':>9}{'stock s':>9}"
        f"{'ours/stock':>11}{'1-proc/stock':>13}{'cpu ours/stock':>15}{'cpu 1-proc/stock':>17}"
        "  max rel diff  1-proc/stock per run",
    ]
    lines += [
        f"{r['params']:<16}{r['features']:>6}{r['first_s']:>9}{r['ours_s']:>9}"
        f"{r['single_s']:>9}{r['stock_s']:>9}{r['ours_over_stock']:>11}"
        f"{r['single_over_stock']:>13}{r['cpu_ours_over_stock']:>15}"
        f"{r['cpu_single_over_stock']:>17}  {r['max_rel_diff']:.1e}"
        f"       {r['single_over_stock_range']}"
        for r in rows
    ]
    memory = None
    if args.memory:
        memory = memory_rows("ht_after_mt", args.slices)
        lines.append(
            f"peak extra memory, ht_after_mt on {args.slices} x 512 x 512: "
            f"ours {memory['ours_mib']} MiB, stock {memory['stock_mib']} MiB"
        )
    sys.stdout.write("\n".join(lines) + "\n")
    if args.json:
        args.json.write_text(json.dumps({"case": header, "rows": rows, "memory": memory}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
