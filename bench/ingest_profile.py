"""Where the receive path spends its CPU, per instance: the node's receiver run in this
process under a per-thread CPU profiler while DCMTK storescu sends to it.

Every thread the receiver starts (pynetdicom's reactor and DUL threads, the handler,
the journal mover) gets its own ``cProfile.Profile`` timed by ``time.thread_time`` (CPU,
not wall time: waiting in ``select`` or ``fdatasync`` costs nothing); the profiles are
merged and each function's own and cumulative CPU is divided by the instances received.
The profiler inflates Python-heavy code, so read shares, and compare the process's CPU
per instance (``cpu_ms_per_instance``, measured without the profiler when ``--plain``).

Run: ``PYTHONPATH=$PWD .venv/bin/python -m bench.ingest_profile [--series 2]
[--associations 4] [--top 40] [--plain]``.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench.ingest import ROWS, SLICES, _instances, _send
from bench.peers import free_port, node_config_toml
from dicomnode.config import load_config
from dicomnode.receiver import Receiver
from dicomnode.state import StateStore

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _start_profiling(frame: FrameType, event: str, arg: Any) -> None:
    """``threading.setprofile`` hook: replace itself by a CPU-timed profiler in this thread."""
    profile = cProfile.Profile(time.thread_time)
    with _lock:
        _profiles.append(profile)
    profile.enable()


def main(argv: Sequence[str] | None = None) -> int:
    """Receive the generated series once under the profiler and print the top functions."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--series", type=int, default=2)
    parser.add_argument("--associations", type=int, default=4)
    parser.add_argument("--top", type=int, default=40)
    parser.add_argument("--plain", action="store_true", help="no profiler: CPU per instance")
    parser.add_argument("--sort", default="tottime", choices=("tottime", "cumulative"))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="ingest-profile-") as tmp:
        root = Path(tmp)
        files = _instances(root / "in", args.series)
        port = free_port()
        config = load_config(node_config_toml(root, port, None, 3600.0, route=False))
        store = StateStore(config.state_dir / "dicomnode.sqlite3")
        receiver = Receiver(config, store)
        if not args.plain:
            threading.setprofile(_start_profiling)
        receiver.start()
        began_cpu, began = time.process_time(), time.perf_counter()
        rate = _send(port, files, args.associations, "DICOMNODE")
        cpu = time.process_time() - began_cpu
        wall = time.perf_counter() - began
        threading.setprofile(None)  # type: ignore[arg-type]
        receiver.stop()
        store.close()
    count = len(files)
    sys.stdout.write(
        f"{count} instances ({SLICES} x {ROWS}^2 per series), {args.associations} associations: "
        f"{rate:.1f}/s, wall {wall:.2f} s, process CPU {cpu * 1000 / count:.2f} ms/instance"
        f"{'' if args.plain else ' (profiled)'}\n"
    )
    if args.plain or not _profiles:
        return 0
    stats = pstats.Stats(_profiles[0])
    for profile in _profiles[1:]:
        stats.add(profile)
    total = sum(entry[2] for entry in stats.stats.values())  # type: ignore[attr-defined]
    sys.stdout.write(f"profiled CPU {total * 1000 / count:.2f} ms/instance\n")
    rows = sorted(
        stats.stats.items(),  # type: ignore[attr-defined]
        key=lambda item: item[1][2 if args.sort == "tottime" else 3],
        reverse=True,
    )
    sys.stdout.write("   own ms   cum ms  calls/inst  function\n")
    for (filename, line, name), (_, calls, own, cum, _) in rows[: args.top]:
        where = "/".join(Path(filename).parts[-2:])
        sys.stdout.write(
            f"{own * 1000 / count:9.3f}{cum * 1000 / count:9.3f}{calls / count:11.1f}  "
            f"{where}:{line}({name})\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
