"""Loading a 300-slice thin-slice head CT keeps little more than the loaded series holds.

The series (300 tilted slices of 512 x 512 at 0.5 mm, 157 MB of pixel data) is loaded
in a fresh process, which reports its peak resident memory (VmHWM) before and after.
Loading reads the files (their encoded pixel data), decodes them into the frames in HU
(float32) and resamples the volume (float32); it may add at most a quarter more than
those three for decoding and resampling (one instance and two planes at a time, plus
the allocator's slack). Decoding into a cached copy per dataset, holding every frame
twice, or resampling through a second whole volume, as loading did before, each break the
bound. Once decoded, the encoded pixel data is dropped: the loaded series holds none.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from pipelines.synthetic import synthetic_head_ct

SLICES, ROWS, THICKNESS_MM, TILT_DEG = 300, 512, 0.5, 18.5
TRANSIENT_SHARE = 0.25  # of what the loaded series holds

CHILD = """
import json, sys
from pathlib import Path

def hwm():
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

from pipelines.volume import load_series

before = hwm()
series = load_series(sorted(Path(sys.argv[1]).glob("*.dcm")))
pixel_bytes = sum(len(ds.PixelData) for ds in series.datasets if "PixelData" in ds)
read_bytes = sum(path.stat().st_size for path in Path(sys.argv[1]).glob("*.dcm"))
print(json.dumps({
    "before": before, "after": hwm(), "pixel_data": pixel_bytes, "read": read_bytes,
    "frame_hu": series.frame_hu.nbytes, "volume": series.volume.hu.nbytes,
    "frames": len(series.frames), "grid": list(series.volume.hu.shape),
}))
"""


def write_thin_slice_series(folder: Path) -> None:
    """300 tilted slices stepping along z as a tilted gantry's do; noise for pixels."""
    (template,) = synthetic_head_ct(
        seed=8, n_slices=1, rows=ROWS, slice_thickness_mm=THICKNESS_MM, gantry_tilt_deg=TILT_DEG
    )
    step_z = THICKNESS_MM / np.cos(np.radians(TILT_DEG))
    origin = np.asarray(template.ImagePositionPatient, dtype=np.float64)
    pixels = np.random.default_rng(8).integers(0, 2000, (ROWS, ROWS), dtype=np.uint16)
    template.PixelData = pixels.astype("<u2").tobytes()
    folder.mkdir()
    for k in range(SLICES):
        position = origin + np.array([0.0, 0.0, k * step_z])
        template.ImagePositionPatient = [f"{v:.4f}" for v in position]
        template.InstanceNumber = k + 1
        template.SOPInstanceUID = template.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        template.save_as(folder / f"{k:04d}.dcm", enforce_file_format=True)


def test_loading_300_slices_stays_near_what_the_series_holds(tmp_path: Path) -> None:
    write_thin_slice_series(tmp_path / "series")
    repo = Path(__file__).resolve().parents[1]
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "series")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["frames"] == SLICES
    assert report["pixel_data"] == 0  # decoded into frame_hu, then dropped
    held = report["read"] + report["frame_hu"] + report["volume"]
    added = report["after"] - report["before"]
    assert added <= (1 + TRANSIENT_SHARE) * held, (
        f"loading added {added / 2**20:.0f} MiB for a series holding {held / 2**20:.0f} MiB"
    )
