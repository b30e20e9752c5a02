"""What the case store adds to a job: the ``ht_after_mt`` run and the case store write
(``dicomnode.case_store.write_case``) on the same generated head CT, side by side in one
run, and the stored size.

    .venv/bin/python -m bench.case_store [--rows 512 --slices 32 --repeats 3]

Prints one line per repeat and the median ratio write / run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from dicomnode.case_store import ARRAYS, CaseStoreSettings, write_case
from pipelines.lesions import insert_lesion
from pipelines.registry import pipeline_factory
from pipelines.run_scope import keeping_cases
from pipelines.settings import PipelinesSettings
from pipelines.synthetic import synthetic_head_ct
from pipelines.volume import load_datasets


def main() -> None:
    """Run the comparison (see the module)."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--slices", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    datasets = synthetic_head_ct(1, rows=args.rows, n_slices=args.slices)
    insert_lesion(datasets, center_mm=None, radius_mm=10.0, hu=70.0, seed=1, irregular=False)
    series = load_datasets(datasets)
    pipeline = pipeline_factory(PipelinesSettings())("ht_after_mt")
    pipeline.run(series)  # warm-up: model loading
    ratios = []
    with tempfile.TemporaryDirectory() as folder:
        settings = CaseStoreSettings(folder=Path(folder), salt="bench-salt-0123456789")
        for repeat in range(args.repeats):
            start = time.perf_counter()
            with keeping_cases():  # as a job whose node has a case store
                result = pipeline.run(series)
            run_s = time.perf_counter() - start
            start = time.perf_counter()
            key = write_case(settings, "ht_after_mt", series.reference, result)
            write_s = time.perf_counter() - start
            assert key is not None
            size = (Path(folder) / key / ARRAYS).stat().st_size
            ratios.append(write_s / run_s)
            print(  # noqa: T201
                f"repeat {repeat}: run {run_s:.2f} s, case store write {write_s:.3f} s "
                f"(ratio {write_s / run_s:.3f}), arrays.npz {size / 1e6:.2f} MB"
            )
    print(  # noqa: T201
        f"{args.rows}x{args.rows}x{args.slices}: median write/run {statistics.median(ratios):.3f}"
    )


if __name__ == "__main__":
    main()
