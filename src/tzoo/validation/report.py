"""Structured results of a validation run: one ``CheckResult`` per check, gathered in a
``ValidationReport`` that a program can read (``failed``, ``to_dict``, ``to_dataframe``) and a
person can read (``to_markdown``, ``to_html``, and Jupyter's rich display).

Every check says pass, warn or fail with the value it measured and the threshold it held that
value to; ``skip`` says why a check does not apply (fp16 on a CPU without it, causality on an
encoder), and ``error`` that the check itself crashed (the traceback's last line is the
message): a report never hides a check that did not run.
"""

from __future__ import annotations

import html
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Status = Literal["pass", "warn", "fail", "skip", "error"]
STATUSES: tuple[Status, ...] = ("pass", "warn", "fail", "skip", "error")
REPORT_VERSION = 1
_BADGES = {"pass": "✅", "warn": "⚠️", "fail": "❌", "skip": "⏭️", "error": "💥"}


@dataclass(frozen=True)
class CheckResult:
    """What one check found. ``value`` and ``threshold`` are plain JSON values (numbers,
    strings, small lists or dicts); ``details`` holds the rest (per-size tables, per-head
    numbers) for programs and the HTML report."""

    name: str
    tier: int
    status: Status
    value: Any
    threshold: Any
    message: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"status must be one of {', '.join(STATUSES)}, not {self.status!r}")

    @property
    def failed(self) -> bool:
        return self.status in ("fail", "error")

    def to_dict(self) -> dict[str, Any]:
        return _jsonable(asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CheckResult:
        return cls(
            name=str(data["name"]),
            tier=int(data["tier"]),
            status=data["status"],
            value=data.get("value"),
            threshold=data.get("threshold"),
            message=str(data.get("message", "")),
            details=dict(data.get("details") or {}),
            seconds=float(data.get("seconds", 0.0)),
        )


@dataclass
class ValidationReport:
    """The results of ``tzoo.validate`` for one model, in the order the checks ran."""

    model: str
    results: list[CheckResult]
    tiers: tuple[int, ...]
    environment: dict[str, Any] = field(default_factory=dict)  # torch version, device, seed

    @property
    def failed(self) -> list[CheckResult]:
        """The checks that failed or crashed."""
        return [r for r in self.results if r.failed]

    @property
    def warnings(self) -> list[CheckResult]:
        return [r for r in self.results if r.status == "warn"]

    @property
    def ok(self) -> bool:
        """No check failed or crashed (warnings and skips allowed)."""
        return not self.failed

    def __getitem__(self, name: str) -> CheckResult:
        for result in self.results:
            if result.name == name:
                return result
        raise KeyError(f"No check {name!r} in this report; it has {', '.join(self.names())}.")

    def names(self) -> list[str]:
        return [r.name for r in self.results]

    def counts(self) -> dict[str, int]:
        return {status: sum(r.status == status for r in self.results) for status in STATUSES}

    # -- formats -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": REPORT_VERSION,
            "model": self.model,
            "tiers": list(self.tiers),
            "environment": _jsonable(self.environment),
            "counts": self.counts(),
            "results": [r.to_dict() for r in self.results],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ValidationReport:
        if data.get("version") != REPORT_VERSION:
            raise ValueError(f"A validation report of version {data.get('version')!r}.")
        return cls(
            model=str(data["model"]),
            results=[CheckResult.from_dict(r) for r in data["results"]],
            tiers=tuple(int(t) for t in data["tiers"]),
            environment=dict(data.get("environment") or {}),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), allow_nan=False)

    def to_dataframe(self) -> Any:
        """A pandas DataFrame, a row per check: name, tier, status, value, threshold,
        message, seconds."""
        import pandas as pd

        rows = [
            {
                "name": r.name,
                "tier": r.tier,
                "status": r.status,
                "value": r.value,
                "threshold": r.threshold,
                "message": r.message,
                "seconds": r.seconds,
            }
            for r in self.results
        ]
        columns = ["name", "tier", "status", "value", "threshold", "message", "seconds"]
        return pd.DataFrame(rows, columns=columns)

    def summary(self) -> str:
        counts = self.counts()
        parts = [f"{counts[s]} {s}" for s in STATUSES if counts[s]]
        return f"{self.model}: {len(self.results)} checks, " + ", ".join(parts or ["none"])

    def to_markdown(self) -> str:
        lines = [
            f"# Validation of {self.model}",
            "",
            self.summary(),
            "",
            "| tier | check | status | value | threshold | message |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        for r in self.results:
            cells = [
                str(r.tier),
                r.name,
                f"{_BADGES[r.status]} {r.status}",
                _short(r.value),
                _short(r.threshold),
                r.message,
            ]
            lines.append(
                "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in cells) + " |"
            )
        return "\n".join(lines) + "\n"

    def to_html(self, *, full_page: bool = True) -> str:
        """The report as HTML (a whole page, or a fragment for Jupyter); every value is
        escaped."""
        esc = html.escape
        rows = []
        for r in self.results:
            details = ""
            if r.details:
                body = esc(json.dumps(_jsonable(r.details), indent=1)[:20000])
                details = f"<details><summary>details</summary><pre>{body}</pre></details>"
            rows.append(
                f'<tr class="tz-{r.status}"><td>{r.tier}</td><td>{esc(r.name)}</td>'
                f"<td>{_BADGES[r.status]} {esc(r.status)}</td><td>{esc(_short(r.value))}</td>"
                f"<td>{esc(_short(r.threshold))}</td><td>{esc(r.message)}{details}</td>"
                f"<td>{r.seconds:.2f}</td></tr>"
            )
        table = (
            f'<div class="tz-validation"><h2>Validation of {esc(self.model)}</h2>'
            f"<p>{esc(self.summary())}</p>"
            "<table><thead><tr><th>tier</th><th>check</th><th>status</th><th>value</th>"
            "<th>threshold</th><th>message</th><th>s</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>"
        )
        if not full_page:
            return table
        style = (
            "body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
            ".tz-fail,.tz-error{background:#fde8e8}.tz-warn{background:#fff6db}"
            ".tz-skip{color:#666}"
        )
        return (
            '<!doctype html><html lang="en"><head><meta charset="utf-8">'
            f"<title>Validation of {esc(self.model)}</title><style>{style}</style></head>"
            f"<body>{table}</body></html>"
        )

    def _repr_html_(self) -> str:
        return self.to_html(full_page=False)

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def __repr__(self) -> str:
        return f"<ValidationReport {self.summary()}>"


def _short(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    text = json.dumps(_jsonable(value)) if not isinstance(value, str) else value
    return text if len(text) <= 80 else text[:79] + "…"


def _jsonable(value: Any) -> Any:
    """``value`` as strict JSON: NaN and infinities as strings, tuples as lists, numpy and
    torch scalars as Python numbers."""
    if isinstance(value, bool) or value is None or isinstance(value, (int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, Iterable):
        return [_jsonable(v) for v in value]
    item = getattr(value, "item", None)
    if callable(item):
        return _jsonable(item())
    return str(value)
