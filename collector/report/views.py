"""The report's cards beyond the epoch panels: the per-step curve and the sample pictures.

Read from the records' JSON form like everything on the page: a run's "steps" records
(``steps.step_curve``) and its "pictures" records, the latest picture of each validation
epoch winning (an amendment's replaces the one built before the late samples came)::

    views = run_views(records)              # run -> RunViews
    html = views["run-1"].cards("run-1")
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from html import escape
from typing import Any

from collector.report.pictures import KIND_TITLES, MAX_SLIDER_EPOCHS, epochs_html
from collector.report.steps import step_curve, step_figure

__all__ = ["RunViews", "run_views"]


@dataclass
class RunViews:
    steps: list[dict[str, Any]] = field(default_factory=list)  # the run's "steps" records
    pictures: dict[str, dict[int, dict]] = field(default_factory=dict)  # kind -> epoch -> it

    def cards(self, anchor: str, ended: bool = False) -> str:
        yet = "" if ended else " yet"
        curve = step_figure(step_curve(self.steps), f"{anchor}-steps")
        body = curve or f'<p class="empty">no steps reported{yet}</p>'
        out = (f'<div class="card" id="{anchor}-curve"><h3>5. Per-step loss and gradient norm</h3>'
               f"{body}</div>")
        for i, (kind, by_epoch) in enumerate(sorted(self.pictures.items())):
            epochs = sorted(by_epoch)
            more = (f" Pick an epoch with the slider (the last and {MAX_SLIDER_EPOCHS - 1} "
                    "others at most)." if len(epochs) > 1 else "")
            note = (f'<p class="facts">Validation epochs {escape(_spans(epochs))}; shown: '
                    f"epoch <b>{epochs[-1]}</b>.{more}</p>")
            div = epochs_html(by_epoch, kind, f"{anchor}-pictures{i + 1}")
            out += (f'<div class="card" id="{anchor}-samples{i + 1}"><h3>6. '
                    f"{escape(KIND_TITLES.get(kind, kind))}</h3>"
                    f"{note}{div}</div>")
        return out


def _spans(epochs: list[int]) -> str:
    out: list[list[int]] = []
    for e in epochs:
        if out and e == out[-1][1] + 1:
            out[-1][1] = e
        else:
            out.append([e, e])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in out)


def run_views(records: Iterable[dict[str, Any]]) -> dict[str, RunViews]:
    """Per run, its step-curve records and its latest picture of each epoch and kind."""
    out: dict[str, RunViews] = {}
    for r in records:
        kind = r.get("type") if isinstance(r, dict) else None
        if kind not in ("steps", "pictures") or "run" not in r:
            continue
        views = out.setdefault(str(r["run"]), RunViews())
        if kind == "steps":
            views.steps.append(r)
        elif isinstance(r.get("epoch"), int) and isinstance(r.get("picture"), dict) \
                and r.get("kind") in KIND_TITLES:
            views.pictures.setdefault(r["kind"], {})[r["epoch"]] = r["picture"]
    return out
