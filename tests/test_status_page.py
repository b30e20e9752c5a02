"""The status page in a real headless browser (Debian's Chromium driven by Selenium): a
series sent by DCMTK appears with its job; a result that could not reach a second PACS is
a dead letter there; its re-send button delivers it exactly once once that PACS is up, and
the job then shows its turnaround, which the Prometheus histogram counts too."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

from dicomnode.config import NodeConfig
from dicomnode.node import Node
from dicomnode.processing import processor, reporting
from dicomnode.records import OutboxState
from pipelines.synthetic import synthetic_head_ct, write_series
from tests.orthanc import Orthanc
from tests.pacs_reports import node_config, storescu, wait_for
from tests.support import free_port, require_tool

TOKEN = "status-page-test-token-0123456789"


@pytest.fixture()
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium (Debian's ``chromium`` and ``chromium-driver``)."""
    options = webdriver.ChromeOptions()
    options.binary_location = require_tool("chromium", "chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    service = Service(executable_path=require_tool("chromedriver", "chromium-driver"))
    driver = webdriver.Chrome(options=options, service=service)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def _config(base: Path, pacs: Orthanc, archive: Orthanc, http_port: int) -> NodeConfig:
    """Results go to ``pacs`` and ``archive``; a delivery not done within 1 s is a dead
    letter."""
    dumped = node_config(base, pacs).model_dump(mode="json")
    dumped["routes"][0]["destinations"] = ["PACS", "ARCHIVE"]
    dumped["destinations"]["ARCHIVE"] = {
        "ae_title": archive.ae_title, "host": "127.0.0.1", "port": archive.dicom_port,
    }  # fmt: skip
    dumped["outbox"] = {"initial_delay_s": 0.2, "max_delay_s": 0.5, "retry_window_h": 1 / 3600}
    dumped["http"] = {"host": "127.0.0.1", "port": http_port, "token": TOKEN}
    return NodeConfig.model_validate(dumped)


def _series() -> list[Dataset]:
    """A small synthetic head CT with marker identifiers the page must never show."""
    datasets = synthetic_head_ct(seed=61, n_slices=8, rows=64)
    for ds in datasets:
        ds.PatientName, ds.PatientID = "Statuspage^Marker", "SPMARKER61"
    return datasets


def _cells(browser: webdriver.Chrome, table: str) -> list[list[str]]:
    """The text of every body cell of one table, row by row."""
    rows = browser.find_elements(By.CSS_SELECTOR, f"#{table} tbody tr")
    return [[cell.text for cell in row.find_elements(By.TAG_NAME, "td")] for row in rows]


def _notice(browser: webdriver.Chrome) -> str:
    """The page's notice line ('' when the page has none)."""
    try:
        found = browser.find_elements(By.ID, "notice")
        return found[0].text if found else ""
    except StaleElementReferenceException:  # the page was replaced while being read
        return ""


def _notice_is(browser: webdriver.Chrome, wanted: str) -> bool:
    """Whether the page shows the notice ``wanted``."""
    return _notice(browser) == wanted


def test_status_page_shows_turnaround_and_resends_dead_letters(
    tmp_path: Path, browser: webdriver.Chrome
) -> None:
    pacs, archive = Orthanc(tmp_path / "pacs"), Orthanc(tmp_path / "archive", "ARCHIVE")
    pacs.start()
    http_port = free_port()
    config = _config(tmp_path / "node", pacs, archive, http_port)
    page = f"http://127.0.0.1:{http_port}/"
    try:
        with Node(config, processor(config), reporting()) as node:
            storescu(node, write_series(_series(), tmp_path / "in"))

            def archive_given_up() -> bool:
                items = node.outbox.items()
                return (
                    bool(items)
                    and all(i.state == OutboxState.SENT for i in items if i.destination == "PACS")
                    and all(
                        i.state == OutboxState.DEAD_LETTER
                        for i in items
                        if i.destination == "ARCHIVE"
                    )
                )

            wait_for(archive_given_up, 120, "the ARCHIVE deliveries to be given up")
            dead = [i.id for i in node.outbox.items() if i.destination == "ARCHIVE"]

            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(page, timeout=10)
            assert refused.value.code == 401

            browser.get(f"{page}?token={TOKEN}")
            assert "SPMARKER61" not in browser.page_source
            assert "Statuspage" not in browser.page_source
            [job] = _cells(browser, "jobs")
            assert job[1:5] == ["hyperdense_regions", "head-ct", "done", "8"]
            assert job[6].endswith(" s") and job[7] == "-"  # ran; not all delivered yet
            deliveries = _cells(browser, "deliveries")
            assert sorted(int(row[0]) for row in deliveries) == sorted(dead)
            assert all(row[3] == "dead letter" and row[2] == "ARCHIVE" for row in deliveries)
            assert browser.find_element(By.ID, "turnaround").text == "no result delivered yet"

            archive.start()
            for outbox_id in dead:
                browser.find_element(By.ID, f"retry-{outbox_id}").click()
                wanted = f"delivery {outbox_id} queued for re-sending"
                wait_for(partial(_notice_is, browser, wanted), 10, "the re-send notice")
            wait_for(lambda: len(archive.instances()) == len(dead), 60, "re-sent results")
            # The archive holds an instance a moment before the sender records it as sent.
            wait_for(
                lambda: all(i.state == OutboxState.SENT for i in node.outbox.items()),
                30,
                "the re-sent deliveries to be recorded as sent",
            )

            browser.get(f"{page}?token={TOKEN}")
            assert _cells(browser, "deliveries") == [["none"]]
            [job] = _cells(browser, "jobs")
            assert job[7].endswith(" s")
            percentiles = {row[0]: row[1] for row in _cells(browser, "turnaround")}
            assert set(percentiles) == {"p50", "p90", "p99", "jobs delivered"}
            assert percentiles["jobs delivered"] == "1"

            # Re-sending what was delivered does nothing: exactly once in the archive.
            browser.execute_script(
                "var f=document.createElement('form');f.method='post';"
                f"f.action='/deliveries/{dead[0]}/retry';"
                f"var t=document.createElement('input');t.name='token';t.value='{TOKEN}';"
                "f.appendChild(t);document.body.appendChild(f);f.submit();"
            )
            wait_for(lambda: "not a dead letter" in browser.page_source, 10, "the refusal")
            metrics = urllib.request.urlopen(f"{page}metrics", timeout=10).read().decode()
            assert "dicomnode_turnaround_seconds_count 1.0" in metrics
            node.wait_idle(30)
            assert len(archive.instances()) == len(dead) == len(pacs.instances())
    finally:
        archive.stop()
        pacs.stop()


def test_a_wrong_token_cannot_resend(tmp_path: Path) -> None:
    """The re-send action needs the token as the page does."""
    pacs = Orthanc(tmp_path / "pacs")
    http_port = free_port()
    config = _config(tmp_path / "node", pacs, pacs, http_port)
    with Node(config, processor(config), reporting()):
        request = urllib.request.Request(
            f"http://127.0.0.1:{http_port}/deliveries/1/retry", data=b"token=wrong", method="POST"
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 403


def test_a_page_off_loopback_needs_a_token() -> None:
    with pytest.raises(ValueError, match=r"http\.token"):
        NodeConfig.model_validate(
            {"node": {"ae_title": "N", "port": free_port()}, "http": {"host": "0.0.0.0"}}
        )
