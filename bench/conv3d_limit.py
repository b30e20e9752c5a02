"""The machine's Conv3d limit: GMAC/s of single large convolutions with BLAST-CT's shapes.

Each row is one ``F.conv3d`` (no bias, valid) on a (1, in, *size) float32 input, in the
default (NCDHW) and the channels-last 3-D (NDHWC) layout, input and weight alike, best
of ``--repeats`` after a warm-up, with ``--threads`` (default: the cores torch uses). The
limit is the best row of the 3x3x3 convolutions; ``bench/blast_ct.py`` reports a member's
GMAC/s as a fraction of it. Runs on CUDA when torch sees a GPU (``--device`` to choose).

Run: ``.venv/bin/python bench/conv3d_limit.py [--size 48,96,96]``; prints JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from torch.nn import functional as F

SHAPES = (  # (in, out, kernel): every convolution of a BLAST-CT member
    (1, 30, 3),
    (30, 30, 3),
    (30, 40, 3),
    (40, 40, 3),
    (40, 50, 3),
    (50, 50, 3),
    (150, 250, 1),
    (250, 250, 1),
    (250, 5, 1),
)


def default_device() -> torch.device:
    """CUDA when torch sees a GPU, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronise(device: torch.device) -> None:
    """Wait for queued kernels (CUDA); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def conv_gmacs(
    shape: tuple[int, int, int],
    size: tuple[int, int, int],
    channels_last: bool,
    device: torch.device,
    repeats: int,
) -> float:
    """GMAC/s of one valid convolution (in, out, kernel) on a (1, in, *size) input."""
    cin, cout, k = shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn((1, cin, *size), generator=generator).to(device)
    w = (torch.randn((cout, cin, k, k, k), generator=generator) / (cin * k**3) ** 0.5).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last_3d)
        w = w.contiguous(memory_format=torch.channels_last_3d)
    with torch.inference_mode():
        y = F.conv3d(x, w)
        synchronise(device)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            y = F.conv3d(x, w)
            synchronise(device)
            best = min(best, time.perf_counter() - start)
    return y.numel() * cin * k**3 / best / 1e9


def measure(device: torch.device, size: tuple[int, int, int], repeats: int) -> dict[str, object]:
    """Every shape in both layouts, and the limit (best 3x3x3 row)."""
    rows = []
    for shape in SHAPES:
        row: dict[str, object] = {"in": shape[0], "out": shape[1], "kernel": shape[2]}
        for layout, channels_last in (("default", False), ("channels_last", True)):
            row[f"{layout}_gmac_s"] = round(
                conv_gmacs(shape, size, channels_last, device, repeats), 1
            )
        rows.append(row)
    limit = max(
        float(str(r[f"{layout}_gmac_s"]))
        for r in rows
        if r["kernel"] == 3
        for layout in ("default", "channels_last")
    )
    return {
        "device": str(device),
        "threads": torch.get_num_threads(),
        "input_size": list(size),
        "convolutions": rows,
        "limit_gmac_s": limit,
    }


def main() -> None:
    """Measure and print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA if any)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument(
        "--size", default="48,96,96", help="input z,y,x (default 48,96,96: a CPU box)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device) if args.device else default_device()
    z, y, x = (int(v) for v in args.size.split(","))
    result = measure(device, (z, y, x), args.repeats)
    sys.stdout.write(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
