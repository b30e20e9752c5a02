"""The status page (``GET /``): what the node received, ran and delivered, as one HTML page.

Plain server-rendered HTML (no script, no external asset), refreshed by the browser every
``REFRESH_S`` seconds. It shows counts, the latest jobs with their durations and
turnarounds, the turnaround percentiles against the configured alarm threshold, the
deliveries still pending and the dead letters, each with a re-send button (a POST form),
and the pipelines and model versions in service. It never shows a patient identifier or a
UID: jobs are named by their number, pipeline and rule.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape

from dicomnode.overview import DeliveryLine, JobLine, Overview

REFRESH_S = 10
RETRY_PATH = "/deliveries/{outbox_id}/retry"

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;font-size:.9em}
th,td{border:1px solid #ccc;padding:.25em .6em;text-align:left}
th{background:#f0f0f0}.alarm{color:#fff;background:#b00020;padding:.2em .5em}
.ok{color:#fff;background:#2e7d32;padding:.2em .5em}.dead{background:#fde0e0}
"""


def render_status_page(
    overview: Overview,
    pipelines: Sequence[dict[str, str | None]],
    alarm_s: float,
    token: str | None = None,
    notice: str | None = None,
) -> str:
    """The whole page; ``token`` is carried by the re-send forms when the page needs one;
    ``notice`` is a one-line message shown on top (the outcome of the last action)."""
    parts = [
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>",
        f"<meta http-equiv='refresh' content='{REFRESH_S}'>",
        f"<title>dicomnode status</title><style>{_STYLE}</style></head><body>",
        "<h1>dicomnode status</h1>",
        f"<p id='notice'>{escape(notice)}</p>" if notice else "",
        _counts(overview.counts),
        _turnaround(overview, alarm_s),
        _deliveries(overview.deliveries, token),
        _jobs(overview.jobs),
        _pipelines(pipelines),
        f"<p><small>generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')}</small></p>",
        "</body></html>",
    ]
    return "".join(parts)


def _table(element_id: str, header: Sequence[str], rows: Sequence[str]) -> str:
    """A table with ``header`` cells and pre-rendered ``rows`` (``<tr>`` elements)."""
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join(rows) or f"<tr><td colspan='{len(header)}'>none</td></tr>"
    return f"<table id='{element_id}'><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cells(values: Sequence[object], css: str = "") -> str:
    """One row of escaped cells."""
    cells = "".join(f"<td>{escape(str(v))}</td>" for v in values)
    return f"<tr class='{css}'>{cells}</tr>" if css else f"<tr>{cells}</tr>"


def _counts(counts: dict[str, dict[str, int]]) -> str:
    """Series, jobs and deliveries by state, and instances stored."""
    rows = [
        _cells([table.replace("_", " "), state, n])
        for table, by_state in counts.items()
        for state, n in sorted(by_state.items())
    ]
    return "<h2>Received and processed</h2>" + _table("counts", ["what", "state", "count"], rows)


def _seconds(value: float | None) -> str:
    """Seconds with one decimal, or a dash."""
    return "-" if value is None else f"{value:.1f} s"


def _turnaround(overview: Overview, alarm_s: float) -> str:
    """Percentiles of the last-instance-to-last-result time, and the alarm state."""
    percentiles = overview.turnaround_percentiles()
    if not percentiles:
        return "<h2>Turnaround</h2><p id='turnaround'>no result delivered yet</p>"
    p90 = percentiles[90.0]
    flag = (
        f"<span class='alarm'>ALARM: p90 above {alarm_s:.0f} s</span>"
        if p90 > alarm_s
        else f"<span class='ok'>within {alarm_s:.0f} s</span>"
    )
    rows = [_cells([f"p{p:.0f}", _seconds(v)]) for p, v in percentiles.items()]
    rows.append(_cells(["jobs delivered", len(overview.turnarounds_s)]))
    return f"<h2>Turnaround (last instance to last result delivered)</h2><p>{flag}</p>" + _table(
        "turnaround", ["percentile", "seconds"], rows
    )


def _retry_form(line: DeliveryLine, token: str | None) -> str:
    """A re-send button for one dead letter."""
    hidden = f"<input type='hidden' name='token' value='{escape(token)}'>" if token else ""
    action = RETRY_PATH.format(outbox_id=line.outbox_id)
    return (
        f"<form method='post' action='{action}'>{hidden}"
        f"<button type='submit' id='retry-{line.outbox_id}'>re-send</button></form>"
    )


def _deliveries(lines: Sequence[DeliveryLine], token: str | None) -> str:
    """Deliveries not yet acknowledged; dead letters highlighted, with a re-send button."""
    rows = []
    for line in lines:
        cells = "".join(
            f"<td>{escape(str(v))}</td>"
            for v in (
                line.outbox_id, line.job_id, line.destination,
                "dead letter" if line.dead else line.state, line.attempts, line.last_error or "",
            )
        )  # fmt: skip
        action = _retry_form(line, token) if line.dead else ""
        css = " class='dead'" if line.dead else ""
        rows.append(f"<tr{css}>{cells}<td>{action}</td></tr>")
    header = ["item", "job", "destination", "state", "attempts", "last error", ""]
    dead = sum(1 for line in lines if line.dead)
    return f"<h2>Deliveries not acknowledged ({dead} dead letters)</h2>" + _table(
        "deliveries", header, rows
    )


def _jobs(lines: Sequence[JobLine]) -> str:
    """The latest jobs, newest first."""
    rows = [
        _cells([
            line.job_id, line.pipeline, line.rule, line.state, line.instances,
            time.strftime("%H:%M:%S", time.localtime(line.created_at)),
            _seconds(line.duration_s), _seconds(line.turnaround_s), line.reason or "",
        ])
        for line in lines
    ]  # fmt: skip
    header = ["job", "pipeline", "rule", "state", "instances", "queued", "ran", "turnaround",
              "reason"]  # fmt: skip
    return "<h2>Latest jobs</h2>" + _table("jobs", header, rows)


def _pipelines(statuses: Sequence[dict[str, str | None]]) -> str:
    """Pipelines in service with their model versions (the start-up check's view)."""
    if not statuses:
        return ""
    keys = sorted({key for status in statuses for key in status})
    rows = [_cells([status.get(key) or "" for key in keys]) for status in statuses]
    return "<h2>Pipelines in service</h2>" + _table("pipelines", keys, rows)
