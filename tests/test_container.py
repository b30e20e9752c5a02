"""The CPU container image, built with buildah and smoke-tested: the demo runs inside it
(a node and a demo PACS on loopback, a synthetic head CT, SEG/SC/SR back).

buildah builds with ``--isolation chroot``: it needs no container runtime, which on this
kind of machine cannot start containers (crun refuses the cgroup layout), and the smoke
test runs the demo the same way, inside the image's file system as its ``dicomnode`` user.
No registry is reachable here, so the Debian base image is made by mmdebstrap from the
Debian mirror (what ``docker.io/library/debian:bookworm-slim`` is made from); a site that
keeps a pip configuration with a local mirror (``/etc/pip.conf``, root's
``~/.config/pip/pip.conf``) has it mounted into the build, as it would pass it in its
own CI. The CUDA image (``deploy/Containerfile.cuda``)
is not built here: its torch wheels are gigabytes this machine does not hold.
"""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from dicomnode.config import load_config
from tests.support import require_tool

REPO = Path(__file__).resolve().parents[1]
BASE_IMAGE = "localhost/dicomnode-base:bookworm"
IMAGE = "localhost/dicomnode:cpu-test"
BUILD_TIMEOUT_S = 2400
PIP_CONFIGS = (Path("/etc/pip.conf"), Path.home() / ".config" / "pip" / "pip.conf")


def _run(*args: str, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    """Run a command, failing the test with its output when it fails."""
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0:
        pytest.fail(f"{' '.join(args[:3])} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return done


def _has_image(buildah: str, name: str) -> bool:
    """Whether buildah's storage holds the image ``name``."""
    done = subprocess.run([buildah, "images", "--quiet", name], capture_output=True, text=True)
    return done.returncode == 0 and bool(done.stdout.strip())


def _base_image(buildah: str, folder: Path) -> str:
    """The Debian 12 base image, made from the Debian mirror when it is not there yet."""
    if not _has_image(buildah, BASE_IMAGE):
        mmdebstrap = require_tool("mmdebstrap", "mmdebstrap")
        rootfs = folder / "bookworm.tar"
        _run(mmdebstrap, "--variant=minbase", "--include=ca-certificates", "bookworm",
             str(rootfs), timeout_s=BUILD_TIMEOUT_S)  # fmt: skip
        container = _run(buildah, "from", "scratch").stdout.strip()
        try:
            _run(buildah, "add", container, str(rootfs), "/")
            _run(buildah, "config", "--cmd", "/bin/bash", container)
            _run(buildah, "commit", "--quiet", container, BASE_IMAGE)
        finally:
            subprocess.run([buildah, "rm", container], capture_output=True)
    return BASE_IMAGE


def _site_pip_volumes() -> list[str]:
    """``--volume`` options for the site's pip configuration files and what they name: a
    CA bundle file, local find-links folders and file:// indexes (mounted read-only at the
    same paths; a folder only below a top-level one, never ``/opt`` itself, where the
    image installs); none when the site has no pip configuration."""
    configs = [path for path in PIP_CONFIGS if path.is_file()]
    mounts: set[str] = set()
    for config in configs:
        mounts.add(str(config))
        for named in re.findall(r"(?:file://)?(/[A-Za-z0-9_./+-]+)", config.read_text()):
            path = Path(named)
            if path.is_dir() and path.name == "simple":  # an index links to ../../files
                path = path.parent
            if path.is_file() or (path.is_dir() and len(path.parts) > 2):
                mounts.add(str(path))
    return [option for mount in sorted(mounts) for option in ("--volume", f"{mount}:{mount}:ro")]


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The CPU image built from this checkout (removed afterwards)."""
    buildah = require_tool("buildah", "buildah")
    base = _base_image(buildah, tmp_path_factory.mktemp("base"))
    # With a site pip configuration, torch comes from the site's mirror too.
    site_pip = _site_pip_volumes()
    torch_index = ["--build-arg", "TORCH_INDEX_URL="] if site_pip else []
    _run(
        buildah, "build", "--isolation", "chroot", "--file", "deploy/Containerfile",
        "--tag", IMAGE, "--build-arg", f"BASE_IMAGE={base}", *torch_index,
        *site_pip, str(REPO),
        timeout_s=BUILD_TIMEOUT_S,
    )  # fmt: skip
    yield IMAGE
    subprocess.run([buildah, "rmi", "--force", IMAGE], capture_output=True)


@pytest.mark.timeout(BUILD_TIMEOUT_S * 2)
def test_the_cpu_image_runs_the_demo(image: str) -> None:
    buildah = require_tool("buildah", "buildah")
    container = _run(buildah, "from", image).stdout.strip()
    try:
        user = _run(buildah, "run", "--isolation", "chroot", container, "--", "id", "-un")
        assert user.stdout.strip() == "dicomnode"  # the image does not run as root
        demo = _run(
            buildah, "run", "--isolation", "chroot", container, "--",
            "/opt/dicomnode/.venv/bin/dicomnode", "demo", "--out", "/var/lib/dicomnode/demo",
            timeout_s=900,
        )  # fmt: skip
    finally:
        subprocess.run([buildah, "rm", container], capture_output=True)
    said = demo.stdout
    # No ../shared in the image: the generated head CT. (Its patient is named "Synthetic",
    # so the log scrubber removes that word from the line, as it would a real name.)
    assert "head CT generated by dicomnode (../shared absent)" in said
    results = re.findall(r": /var/lib/dicomnode/demo/pacs/(\w+)-", said)
    assert {"SEG", "SR"} <= set(results) and len(results) >= 3, said  # + Secondary Captures


def test_compose_file_and_its_config() -> None:
    """The compose file names the node image and Orthanc; its node config is valid and
    sends to the compose file's Orthanc service."""
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    assert set(compose["services"]) == {"node", "orthanc"}
    node = compose["services"]["node"]
    assert node["image"] == "localhost/dicomnode:cpu"
    assert "./compose.toml:/etc/dicomnode/dicomnode.toml:ro" in node["volumes"]
    config = load_config(REPO / "deploy" / "compose.toml")
    destination = config.destinations["PACS"]
    assert destination.host == "orthanc" and destination.port == 4242
    orthanc_env = compose["services"]["orthanc"]["environment"]
    assert orthanc_env["ORTHANC__DICOM_AET"] == destination.ae_title
    assert orthanc_env["ORTHANC__DICOM_PORT"] == str(destination.port)
    assert str(config.node.port) in orthanc_env["ORTHANC__DICOM_MODALITIES"]
