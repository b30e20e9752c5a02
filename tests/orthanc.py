"""A real Orthanc PACS for the tests, on free loopback ports, with its REST API."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.support import free_port, require_tool


class Orthanc:
    """Orthanc started from the Debian package with its own storage in ``folder``.

    Orthanc 1.10 listens on every interface; remote access stays off and the tests only
    ever talk to it on loopback.
    """

    def __init__(self, folder: Path, ae_title: str = "ORTHANC") -> None:
        self.executable = require_tool("Orthanc", "orthanc")
        self.folder = folder
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config_path = folder / "orthanc.json"
        self.config_path.write_text(json.dumps(self._config(), indent=2))

    def _config(self) -> dict[str, Any]:
        return {
            "Name": "dicomnode-test-pacs",
            "StorageDirectory": str(self.folder / "storage"),
            "IndexDirectory": str(self.folder / "storage"),
            "DicomAet": self.ae_title,
            "DicomPort": self.dicom_port,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "UnknownSopClassAccepted": True,
            "DicomModalities": {},
            "Plugins": [],
            "HttpServerEnabled": True,
            "StableAge": 1,
        }

    def start(self, timeout_s: float = 30.0) -> None:
        """Start Orthanc and wait until its REST API answers."""
        log = (self.folder / "orthanc.log").open("ab")
        self.process = subprocess.Popen(
            [self.executable, str(self.config_path)], stdout=log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Orthanc exited; see {self.folder / 'orthanc.log'}")
            try:
                self.get("/system")
                return
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        raise TimeoutError("Orthanc did not answer in time")

    def stop(self) -> None:
        """Stop Orthanc (its storage is kept, so it can be started again)."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=30)
            self.process = None

    def get(self, path: str) -> Any:
        """GET a REST resource and decode its JSON."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:
            return json.loads(response.read())

    def delete(self, path: str) -> None:
        """DELETE a REST resource."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=10).close()

    def instances(self) -> list[dict[str, str]]:
        """Simplified main tags of every stored instance."""
        return [self.get(f"/instances/{i}/simplified-tags") for i in self.get("/instances")]

    def download(self, sop_instance_uid: str, target: Path) -> Path:
        """Write the stored file of one instance to ``target``."""
        found = [
            i
            for i in self.get("/instances")
            if self.get(f"/instances/{i}/simplified-tags")["SOPInstanceUID"] == sop_instance_uid
        ]
        url = f"http://127.0.0.1:{self.http_port}/instances/{found[0]}/file"
        with urllib.request.urlopen(url, timeout=30) as response:
            target.write_bytes(response.read())
        return target
