"""Why /health is degraded (pure), and the filters of the deliveries/jobs commands."""

from __future__ import annotations

import json
from pathlib import Path

from dicomnode.degraded import degraded_reasons
from dicomnode.deliveries import DeliveryAdmin, Selection
from dicomnode.state import StateStore

GIB = 1 << 30


def test_no_reason_is_ok_and_each_problem_is_named() -> None:
    assert degraded_reasons({"dead_letters": 0, "failed_jobs": 0}, [], 5 * GIB, GIB) == []
    reasons = degraded_reasons(
        {"dead_letters": 2, "failed_jobs": 1},
        [
            {"name": "ht_after_mt", "status": "unavailable", "reason": "hash differs",
             "fallback": "hyperdense_regions"},
            {"name": "hyperdense_regions", "status": "available", "reason": None,
             "fallback": None},
        ],
        GIB // 2,
        GIB,
    )  # fmt: skip
    assert len(reasons) == 4
    assert reasons[0].startswith("2 dead letter(s)")
    assert reasons[1].startswith("1 failed job(s) not retried")
    assert reasons[2] == (
        "pipeline ht_after_mt refused at start: hash differs; hyperdense_regions runs instead"
    )
    assert reasons[3].startswith("low disk: 536870912 bytes free")


def _rows(store: StateStore) -> None:
    """Three jobs and outbox items: two destinations, created at 0, 100 and 200 s."""
    with store.transaction() as db:
        for n, (destination, state) in enumerate(
            [("PACS", "dead_letter"), ("ARCHIVE", "dead_letter"), ("PACS", "sent")]
        ):
            created = 100.0 * n
            db.execute(
                "INSERT INTO jobs (series_instance_uid, study_instance_uid, rule, pipeline, "
                "destinations, state, created_at, finished_at) VALUES (?,?,?,?,?,?,?,?)",
                (f"1.2.{n}", "1.2", "head", "p", json.dumps([destination]),
                 "failed" if n == 0 else "done", created, created),
            )  # fmt: skip
            db.execute(
                "INSERT INTO outbox (job_id, path, destination, state, attempts, "
                "next_attempt_at, created_at) VALUES (?,?,?,?,?,?,?)",
                (n + 1, f"r{n}.dcm", destination, state, 3, created, created),
            )


def test_filters_by_state_destination_and_age(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "state.sqlite3")
    _rows(store)
    admin = DeliveryAdmin(store)
    now = 250.0

    def ids(selection: Selection) -> list[int]:
        return [item.id for item in admin.deliveries(selection, now)]

    assert ids(Selection()) == [1, 2, 3]
    assert ids(Selection(states=("dead_letter",))) == [1, 2]
    assert ids(Selection(destination="PACS")) == [1, 3]
    assert ids(Selection(older_than_s=120.0)) == [1, 2]  # created at or before 130 s
    assert ids(Selection(states=("dead_letter",), destination="ARCHIVE")) == [2]
    assert [j.id for j in admin.jobs(Selection(destination="ARCHIVE"), now)] == [2]
    assert [j.id for j in admin.jobs(Selection(states=("failed",)), now)] == [1]
    assert admin.problem_counts(now, 1000.0) == {"dead_letters": 2, "failed_jobs": 1}
    assert admin.problem_counts(now, 100.0) == {"dead_letters": 2, "failed_jobs": 0}
    assert admin.discard_deliveries(Selection(destination="ARCHIVE"), now) == [2]
    assert admin.retry_deliveries(Selection(), now) == [1]  # only dead letters
    assert admin.retry_deliveries(Selection(), now) == []
    store.close()
