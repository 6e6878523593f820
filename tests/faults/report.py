"""Figures of the fault suite: each scenario records what it measured, then checks its promises.

Every promise of a scenario is checked and reported together (a scenario does not stop at the
first broken one), so the figures are complete even when it fails.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

RESULTS_PATH = Path(__file__).parent / "results" / "latest.json"
FIGURES: dict[str, dict[str, Any]] = {}
BROKEN: dict[str, list[str]] = {}

# the columns of the summary table: (figure key, heading)
COLUMNS = [
    ("duplicates", "dups"),
    ("overlaps", "overlaps"),
    ("201s", "201s"),
    ("503s", "503s"),
    ("503s_without_retry_after", "503 no RA"),
    ("500s", "500s"),
    ("no_answer", "no answer"),
    ("max_answer_s", "max answer s"),
    ("recovery_s", "recovery s"),
    ("ready_again_s", "ready again s"),
    ("shutdown_s", "shutdown s"),
    ("claimed_after_signal", "claimed after sig"),
    ("not_completed", "not completed"),
    ("inputs_not_4xx", "inputs not 4xx"),
    ("failures", "failures"),
]


class Promises:
    """check(ok, text) for each promise; verify() fails with every broken one."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.broken: list[str] = []
        BROKEN[scenario] = self.broken
        FIGURES.setdefault(scenario, {})

    def record(self, **figures: Any) -> None:
        FIGURES[self.scenario].update(figures)

    def check(self, ok: bool, text: str) -> None:
        if not ok:
            self.broken.append(text)

    def verify(self) -> None:
        assert not self.broken, f"{self.scenario}: broken promises:\n- " + "\n- ".join(self.broken)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def table() -> str:
    headings = ["scenario", *(h for _, h in COLUMNS), "result"]
    rows = []
    for scenario, figures in FIGURES.items():
        broken = BROKEN.get(scenario, [])
        rows.append([scenario, *(_cell(figures.get(k)) for k, _ in COLUMNS), "FAIL" if broken else "pass"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headings)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headings, widths, strict=True))]
    lines.append("-|-".join("-" * w for w in widths))
    lines += [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    for scenario, broken in BROKEN.items():
        for text in broken:
            lines.append(f"  {scenario}: {text}")
    return "\n".join(lines)


def write_json() -> None:
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "written_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "scenarios": {
            name: {"figures": figures, "broken": BROKEN.get(name, []), "passed": not BROKEN.get(name)}
            for name, figures in FIGURES.items()
        },
    }
    RESULTS_PATH.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")


def markdown(path: Path = RESULTS_PATH) -> str:
    """The README's table, from a results file: `python -m tests.faults.report`."""
    document = json.loads(path.read_text())
    headings = ["scenario", *(h for _, h in COLUMNS), "promises"]
    lines = ["| " + " | ".join(headings) + " |", "|" + "---|" * len(headings)]
    for name, scenario in document["scenarios"].items():
        figures = scenario["figures"]
        verdict = "all kept" if scenario["passed"] else f"{len(scenario['broken'])} broken"
        lines.append("| " + " | ".join([name, *(_cell(figures.get(k)) for k, _ in COLUMNS), verdict]) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(markdown())
