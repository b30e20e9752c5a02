"""The floor of one durable journal append on this disk: median latency of writing one
instance-sized record and making it durable, by each way Linux offers, side by side.

Each method appends ``--record-kib`` records one after the other into a file on the
given folder's file system (the node's state folder in production):

- ``fdatasync_fallocated``: ``pwritev`` into a ``posix_fallocate``-d segment, then
  ``fdatasync`` (the journal before this change: the first write of each block converts
  an unwritten extent, a metadata change the flush must commit too);
- ``fdatasync_prewritten``: the same into a segment whose blocks were written (zeros)
  and flushed beforehand, so that only data and the disk cache are flushed;
- ``o_dsync_prewritten``: ``pwritev`` on a descriptor opened with ``O_DSYNC``;
- ``rwf_dsync_prewritten``: ``pwritev2(..., RWF_DSYNC)`` (per-write O_DSYNC);
- ``sync_file_range_prewritten``: ``sync_file_range(WAIT_BEFORE | WRITE | WAIT_AFTER)``,
  for comparison only: it does not flush the disk's volatile cache nor metadata, so it
  is **not durable** and the journal cannot use it.

Run: ``.venv/bin/python -m bench.journal_sync [--folder DIR] [--count 60]
[--record-kib 520] [--json out.json]``.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

SYNC_FILE_RANGE_WAIT_BEFORE, SYNC_FILE_RANGE_WRITE, SYNC_FILE_RANGE_WAIT_AFTER = 1, 2, 4
_libc = ctypes.CDLL(None, use_errno=True)
_libc.sync_file_range.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)


def _sync_file_range(fd: int, offset: int, length: int) -> None:
    """``sync_file_range`` with wait-before, write and wait-after."""
    flags = SYNC_FILE_RANGE_WAIT_BEFORE | SYNC_FILE_RANGE_WRITE | SYNC_FILE_RANGE_WAIT_AFTER
    if _libc.sync_file_range(fd, offset, length, flags) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def _segment(path: Path, size: int, prewritten: bool) -> None:
    """A segment file of ``size`` bytes: fallocated, or written with zeros, both flushed."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if prewritten:
            block = bytes(1 << 20)
            for offset in range(0, size, len(block)):
                os.pwrite(fd, block[: size - offset], offset)
        else:
            os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    finally:
        os.close(fd)


def _measure(
    path: Path, record: bytes, count: int, open_flags: int,
    durable: Callable[[int, int, int], None] | None, write_flags: int = 0,
) -> list[float]:  # fmt: skip
    """Seconds of each of ``count`` appends of ``record`` (write, then ``durable``)."""
    fd = os.open(path, os.O_RDWR | open_flags)
    took = []
    try:
        for index in range(count):
            offset = index * len(record)
            began = time.perf_counter()
            os.pwritev(fd, [record], offset, write_flags)
            if durable is not None:
                durable(fd, offset, len(record))
            took.append(time.perf_counter() - began)
    finally:
        os.close(fd)
    return took


def run(folder: Path, count: int, record_kib: int) -> dict[str, float]:
    """Median milliseconds per durable append, by method."""
    record = os.urandom(record_kib * 1024)
    size = (count + 1) * len(record)
    methods: dict[str, tuple[bool, int, Callable[[int, int, int], None] | None, int]] = {
        "fdatasync_fallocated": (False, 0, lambda fd, _o, _n: os.fdatasync(fd), 0),
        "fdatasync_prewritten": (True, 0, lambda fd, _o, _n: os.fdatasync(fd), 0),
        "o_dsync_prewritten": (True, os.O_DSYNC, None, 0),
        "rwf_dsync_prewritten": (True, 0, None, os.RWF_DSYNC),
        "sync_file_range_prewritten": (True, 0, _sync_file_range, 0),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    with tempfile.TemporaryDirectory(prefix="journal-sync-", dir=folder) as tmp:
        for _ in range(3):  # interleaved: a busy moment hits every method alike
            for name, (prewritten, open_flags, durable, write_flags) in methods.items():
                path = Path(tmp) / f"{name}.journal"
                _segment(path, size, prewritten)
                times[name] += _measure(path, record, count // 3, open_flags, durable,
                                        write_flags)  # fmt: skip
                path.unlink()
    return {name: round(statistics.median(t) * 1000, 3) for name, t in times.items()}


def main(argv: Sequence[str] | None = None) -> int:
    """Print the median latency of each method and its ratio to ``fdatasync_fallocated``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--folder", type=Path, default=Path(tempfile.gettempdir()))
    parser.add_argument("--count", type=int, default=60)
    parser.add_argument("--record-kib", type=int, default=520)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    medians = run(args.folder, args.count, args.record_kib)
    base = medians["fdatasync_fallocated"]
    result = {
        "record_kib": args.record_kib, "appends": args.count,
        "median_ms": medians,
        "ratio_to_fdatasync_fallocated": {k: round(v / base, 2) for k, v in medians.items()},
        "load_average": round(os.getloadavg()[0], 1),
    }  # fmt: skip
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
