"""The HTML health report: one self-contained page from the collector's records.

A verdict first, then the sweep table, then per run the seed's four dashboard panels, its
per-step loss and gradient norm, pictures of what it generated beside the training data
(``views``), the timeline of what was raised, the diagnoses with their remedies and the
per-rank counts.
plotly.js is embedded once, so the file opens offline (it is about 5 MB)::

    write_report(records, "out/report.html", profile, ranks=pipeline.state.rank_table())

``records`` are the records' JSON form (``MemorySink.json()``, or the JSONL's lines): the
report shows exactly what the JSONL holds.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterable
from html import escape
from typing import Any

from collector.analysis.profile import Profile
from collector.report import plots as report_plots
from collector.report.model import (
    SEVERITY_RANK,
    Finding,
    RunData,
    Verdict,
    epoch_spans,
    group_runs,
    loss_trend,
    summary_row,
    verdict,
)
from collector.report.views import RunViews, run_views

__all__ = ["render_report", "write_report"]

SUMMARY_COLUMNS = (  # the seed's sweep priorities first
    ("final_knee_healthy", "final knee healthy"), ("final_grf_healthy", "final GRF healthy"),
    ("min_total_loss", "min total loss"), ("first_knee_healthy_epoch", "first knee healthy"),
    ("first_grf_healthy_epoch", "first GRF healthy"), ("total_loss_slope", "loss slope"),
    ("grad_norm_mean_cv", "grad norm CV"), ("ema_diff_mean", "mean EMA diff"),
    ("dropped", "dropped"), ("rejected", "rejected"), ("seq_gaps", "sequence gaps"),
    ("missing_ranks", "missing ranks"), ("late_epochs", "late epochs"),
)
PHASES = {1: "early training", 2: "convergence", 3: "fine-tuning"}  # the guide's names
LEVEL_TEXT = {"healthy": "Healthy", "recovered": "Warnings earlier",
              "warnings": "Warnings raised", "unhealthy": "Unhealthy",
              "no data": "No data yet"}
LEVEL_ORDER = ("unhealthy", "warnings", "recovered", "no data", "healthy")

_CSS = """
:root{--good:#1b7f3b;--warn:#b45309;--bad:#b3261e;--mute:#64748b;--line:#e2e8f0}
*{box-sizing:border-box}body{margin:0;font:14px/1.45 system-ui,-apple-system,"Segoe UI",
Roboto,sans-serif;color:#0f172a;background:#f8fafc}main{max-width:1500px;margin:auto;
padding:0 20px 40px}h1{margin:0 0 4px;font-size:22px}h2{margin:28px 0 8px;font-size:19px}
h3{margin:18px 0 6px;font-size:16px}.verdict{padding:18px 20px;color:#fff}
.verdict p{margin:2px 0;font-size:15px}.lvl-healthy{background:var(--good)}
.lvl-recovered,.lvl-warnings{background:var(--warn)}.lvl-unhealthy{background:var(--bad)}
.lvl-no-data{background:var(--mute)}.verdict a{color:#fff}.card{background:#fff;
border:1px solid var(--line);border-radius:8px;padding:12px 16px;margin:12px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(560px,1fr));gap:12px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-size:12px;
font-weight:600}table{border-collapse:collapse;width:100%;background:#fff}
th,td{padding:5px 9px;border-bottom:1px solid var(--line);text-align:left;
vertical-align:top}th{background:#f1f5f9;font-weight:600}td.n,th.n{text-align:right;
font-variant-numeric:tabular-nums}tr.best td{background:#ecfdf5}.bad{color:var(--bad);
font-weight:600}.ok{color:var(--good)}.empty{color:var(--mute);font-style:italic}
.facts{color:var(--mute)}.facts b{color:#0f172a}.facts b.bad{color:var(--bad)}
.facts b.ok{color:var(--good)}.sev-critical,.sev-error{background:var(--bad)}
.sev-warning,.sev-warn{background:var(--warn)}.sev-info{background:var(--mute)}
.remedy{border-left:4px solid var(--warn);padding:6px 12px;margin:8px 0;background:#fffbeb}
details{margin:6px 0}summary{cursor:pointer;color:var(--mute)}
"""


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if value.is_integer() and abs(value) < 1e9:
            return str(int(value))
        return f"{value:.4g}"
    return escape(str(value))


def _level_class(level: str) -> str:
    return "lvl-" + level.replace(" ", "-")


def _badge(level: str) -> str:
    return f'<span class="badge {_level_class(level)}">{LEVEL_TEXT[level]}</span>'


def _severity_badge(severity: str) -> str:
    cls = "sev-" + (severity.lower() if severity.lower() in SEVERITY_RANK else "warning")
    return f'<span class="badge {cls}">{escape(severity)}</span>'


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _table(headers: Iterable[str], rows: Iterable[Iterable[str]], numeric: set[int],
           row_classes: list[str] | None = None) -> str:
    """Columns in ``numeric`` align right, their headers with them."""
    head = "".join(f'<th class="n">{h}</th>' if j in numeric else f"<th>{h}</th>"
                   for j, h in enumerate(headers))
    body = []
    for i, row in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        cells = "".join(f'<td class="n">{c}</td>' if j in numeric else f"<td>{c}</td>"
                        for j, c in enumerate(row))
        body.append(f"<tr{cls}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _ended(run: RunData) -> str:
    """How the run ended, in words (with the collector's stop action, if it took one); ""
    while it runs or when it finished normally."""
    stop = f" (told to stop at step {run.stop[0]}: {run.stop[1]})" if run.stop else ""
    if run.ended is None or (run.ended == "finished" and not stop):
        return stop.strip(" ()")
    at = run.last_epoch()
    return f"ended: {run.ended}" + (f" at epoch {at}" if at is not None else
                                    ", before any epoch closed") + stop


def _verdict_header(title: str, runs: list[RunData], verdicts: list[Verdict],
                    ranks: dict | None) -> str:
    level = min((v.level for v in verdicts), key=LEVEL_ORDER.index, default="no data")
    lines = []
    if not runs:
        lines.append("No run has reported yet.")
    elif level == "healthy":
        info = any(run.findings() for run in runs)  # info-level ones: healthy all the same
        lines.append(f"All {len(runs)} run(s) healthy: " + (
            "only info-level findings were raised." if info else "no health rule was raised."))
    for run, v in zip(runs, verdicts, strict=True):
        link = f'<a href="#{run.anchor}">{escape(run.run)}</a>'
        names = ", ".join
        active = [f.key for f in v.findings if f.active and f.key not in v.collapse]
        cleared = [f.key for f in v.findings if not f.active]
        parts = []
        if v.collapse:
            parts.append("the generated samples collapsed: " + names(v.collapse))
        trend = loss_trend(run)
        if trend is not None and trend.rose:
            parts.append(trend.text())
        if active:
            parts.append(("also " if v.collapse else "") + "raised at the last epoch: "
                         + names(active))
        if cleared:
            parts.append("raised earlier, cleared by the last epoch: " + names(cleared))
        if _ended(run):
            parts.append(_ended(run))
        if v.level == "no data":
            parts.append("ended before any epoch closed" if run.ended else "no epoch closed yet")
        if parts:
            lines.append(f"{link}: {LEVEL_TEXT[v.level]} — " + escape(" — ".join(parts)))
    lost = sum(_lost(r, ranks) for r in runs)
    if lost:
        lines.append(f"Data incomplete: {lost} message(s) dropped or rejected.")
    body = "".join(f"<p>{line}</p>" for line in lines)
    return (f'<header class="verdict {_level_class(level)}"><h1>{escape(title)}: '
            f"{LEVEL_TEXT[level]}</h1>{body}</header>")


def _sweep_table(runs: list[RunData], verdicts: list[Verdict]) -> str:
    rows = [(run, v, summary_row(run)) for run, v in zip(runs, verdicts, strict=True)]
    rows.sort(key=lambda t: (-_sort_num(t[2].get("final_knee_healthy"), 0.0),
                             -_sort_num(t[2].get("final_grf_healthy"), 0.0),
                             _sort_num(t[2].get("min_total_loss"), math.inf)))
    extra = sorted({k for _, _, s in rows for k in s} - {k for k, _ in SUMMARY_COLUMNS}
                   - {"_live"})
    headers = ["run", "verdict", "ended", "last epoch"] + [h for _, h in SUMMARY_COLUMNS] + \
        [escape(k) for k in extra]
    table_rows, classes = [], []
    for i, (run, v, s) in enumerate(rows):
        live = ' <span class="facts">(live)</span>' if s.get("_live") else ""
        cells = [f'<a href="#{run.anchor}">{escape(run.run)}</a>{live}', _badge(v.level),
                 escape(run.ended or "running"), _fmt(run.last_epoch())]
        cells += [_fmt(s.get(k)) for k, _ in SUMMARY_COLUMNS] + [_fmt(s.get(k)) for k in extra]
        table_rows.append(cells)
        classes.append("best" if i == 0 and len(rows) > 1 else "")
    note = ('<p class="facts">Ranked by the seed\'s sweep priorities: final knee and GRF '
            "health, then the lowest total loss."
            + (" (live) rows have no summary record yet; their figures come from the epochs "
               "so far." if any(s.get("_live") for _, _, s in rows) else "") + "</p>")
    return ("<h2>Sweep summary</h2>" + note +
            _table(headers, table_rows, set(range(3, len(headers))), classes))


def _sort_num(value: Any, missing: float) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return float(value) if ok else missing


def _phase_text(phase: int, profile: Profile) -> str:
    ends = profile.phase_ends
    lo = ends[phase - 2] + 1 if phase >= 2 and phase - 2 < len(ends) else 1
    span = f"epochs {lo}-{ends[phase - 1]}" if phase - 1 < len(ends) else f"epochs {lo}+"
    return f"{PHASES.get(phase, 'phase')}, {span}"


def _facts(run: RunData, v: Verdict, profile: Profile) -> str:
    last = run.last_metrics()
    facts = [f"world size <b>{_fmt(run.world_size)}</b>",
             f"epochs <b>{len(run.epochs)}</b> (last <b>{_fmt(run.last_epoch())}</b>)"]
    if _ended(run):
        facts.append(f"<b>{escape(_ended(run))}</b>")
    trend = loss_trend(run)
    if trend is not None and trend.rose:
        facts.append(f'<b class="bad">{escape(trend.text())}</b>')
    phase = last.get("health/phase")
    if isinstance(phase, (int, float)) and math.isfinite(phase):
        facts.append(f"phase <b>{int(phase)}</b> ({_phase_text(int(phase), profile)})")
    score = last.get("health/mode_collapse_score")
    collapse = profile.diagnosis("mode_collapse")
    if _is_number(score) and math.isfinite(score) and collapse is not None:
        cls = "bad" if score >= collapse.require else "ok"
        facts.append(f'mode-collapse checklist <b class="{cls}">{int(score)}/'
                     f"{len(collapse.conditions)}</b> ({collapse.require} or more: collapse)")
    out = f'<p class="facts">{_badge(v.level)} ' + " · ".join(facts) + "</p>"
    for name, values in (("Configuration", run.config), ("Data statistics", run.data_stats),
                         ("Environment", run.env)):
        if values:
            rows = [(escape(str(k)), _fmt(val)) for k, val in sorted(values.items())]
            numeric = {1} if all(_is_number(x) for x in values.values()) else set()
            out += (f"<details><summary>{name} ({len(rows)})</summary>"
                    f"{_table(['key', 'value'], rows, numeric)}</details>")
    return out


def _panels(run: RunData, profile: Profile) -> str:
    yet = "" if run.ended else " yet"
    notes = (f"no epoch has closed{yet}",
             f"no validation samples were logged{yet}",
             f"no batch-loss, generation or EMA statistics{yet}",
             "no loss components reported (loss_ratio/*)")
    cards = []
    for i, title in enumerate(report_plots.PANEL_TITLES):
        div = report_plots.panel_figure(i, run.epochs, f"{run.anchor}-panel{i + 1}", profile)
        body = div if div else f'<p class="empty">{notes[i]}</p>'
        cards.append(f'<div class="card"><h3>{i + 1}. {title}</h3>{body}</div>')
    return f'<div class="grid">{"".join(cards)}</div>'


def _events(run: RunData, findings: list[Finding]) -> str:
    out = "<h3>Health findings</h3>"
    timeline = report_plots.findings_timeline(findings, sorted(run.epochs),
                                              f"{run.anchor}-events")
    if timeline is None:
        return out + '<p class="empty">No health rule or diagnosis was raised.</p>'
    rows = []
    for f in findings:
        raised = epoch_spans(f.epochs) if f.epochs else "between epochs only"
        rows.append((escape(f.key), _severity_badge(f.severity), escape(raised),
                     str(len(f.raised_events)), escape(epoch_spans(f.cleared_at))
                     if f.cleared_at else "—", "yes" if f.active else "no",
                     escape(f.message)))
    return out + f'<div class="card">{timeline}</div>' + _table(
        ["rule", "severity", "raised at epochs", "times raised", "cleared at",
         "raised at the end", "latest message"], rows, {3})


def _diagnoses(run: RunData, findings: list[Finding]) -> str:
    out = "<h3>Diagnoses and remedies</h3>"
    parts = []
    for f in findings:
        if not f.is_diagnosis:
            continue
        text = escape(f.remedy) if f.remedy else '<span class="empty">no remedy recorded</span>'
        when = f"epochs {epoch_spans(f.epochs)}" if f.epochs else "between epochs"
        now = "; raised at the end" if f.active else ""
        parts.append(f'<div class="remedy"><b>{escape(f.name)}</b> '
                     f'<span class="facts">({escape(when)}{now})</span>'
                     f"<br>Remedy: {text}</div>")
    shown = {f.remedy for f in findings if f.is_diagnosis}
    other = [(f.key, f.remedy) for f in findings if not f.is_diagnosis and f.remedy
             and f.remedy not in shown and SEVERITY_RANK.get(f.severity.lower(), 2) < 3]
    if other:
        if not parts:
            parts.append('<p class="empty">No diagnosis was raised. The remedies of the '
                         "rules that were:</p>")
        parts.append(_table(["rule", "remedy"],
                            [(escape(r), escape(m)) for r, m in other], set()))
    if not parts:
        return out + ('<p class="empty">No diagnosis was raised: none of the profile\'s '
                      "problem patterns matched.</p>")
    return out + "".join(parts)


RANK_ROWS = 64  # ranks the table lists at most: those with losses first, then the lowest


def _ranks(run: RunData, counts: dict[Any, dict[str, Any]] | None) -> str:
    out = "<h3>Ranks</h3>"
    by_rank = {int(k): v for k, v in (counts or {}).items() if str(k).isdigit()}
    lossy = [r for r, c in by_rank.items()
             if (c.get("seq_gaps") or 0) > 0 or (c.get("reported_drops") or 0) > 0]
    lossy += [r for r in by_rank if r not in lossy and run.missed(r)]
    names = sorted(set(lossy[:RANK_ROWS]) | set(
        (list(by_rank) or run.reported_ranks(RANK_ROWS))[:max(0, RANK_ROWS - len(lossy))]))
    never = run.never_reported()
    if not names and not never:
        return out + '<p class="empty">No per-rank counts for this run.</p>'
    rows = []
    for rank in names:
        c = by_rank.get(rank) or {}
        cells = [str(rank)]
        for key in ("messages", "seq_gaps", "reported_drops"):
            value = c.get(key)
            bad = key != "messages" and isinstance(value, (int, float)) and value > 0
            cells.append(f'<span class="bad">{_fmt(value)}</span>' if bad else _fmt(value))
        n_missing = run.missed(rank)
        cells.append(f'<span class="bad">{n_missing}</span>' if n_missing else "0")
        rows.append(cells)
    shown = len(set(by_rank) | {r for lo, hi in run.reported for r in (lo, hi)})
    note = (f'<p class="facts">{len(names)} of {max(shown, len(names))} ranks shown: those '
            "with losses first.</p>" if shown > len(names) else "")
    if never:
        n = sum(hi - lo + 1 for lo, hi in never)
        spans = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in never)
        note += (f'<p class="bad">{n} rank(s) of the world never reported an epoch: '
                 f"{escape(spans)}</p>")
    return out + _table(["rank", "messages", "sequence gaps", "reported drops",
                         "epochs missing"], rows, {1, 2, 3, 4}) + note


def _lost(run: RunData, ranks: dict | None) -> int:
    """Messages lost to drops or rejects: the summary's count, or the per-rank drops."""
    per_rank = sum(int(c.get("reported_drops") or 0)
                   for c in ((ranks or {}).get(run.run) or {}).values() if isinstance(c, dict))
    return max(run.lost(), per_rank)


def _run_section(run: RunData, v: Verdict, ranks: dict[str, Any] | None,
                 profile: Profile, views: RunViews) -> str:
    counts = (ranks or {}).get(run.run)
    findings = run.findings()
    return (f'<section id="{run.anchor}"><h2>Run {escape(run.run)}</h2>'
            f"{_facts(run, v, profile)}{_panels(run, profile)}"
            f"{views.cards(run.anchor, bool(run.ended))}{_events(run, findings)}"
            f"{_diagnoses(run, findings)}{_ranks(run, counts)}</section>")


def render_report(records: list[dict], profile: Profile, ranks: dict | None = None,
                  title: str | None = None) -> str:
    """One self-contained HTML page for ``records`` (any mix of runs and record types)."""
    from plotly.offline import get_plotlyjs

    title = title or "trainwatch health report"
    runs = group_runs(records)
    verdicts = [verdict(run, profile) for run in runs]
    views = run_views(records)
    sections = "".join(_run_section(r, v, ranks, profile, views.get(r.run, RunViews()))
                       for r, v in zip(runs, verdicts, strict=True))
    sweep = _sweep_table(runs, verdicts) if runs else ""
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(title)}</title><style>{_CSS}</style>"
            f'<script type="text/javascript">{get_plotlyjs()}</script></head><body>'
            f"{_verdict_header(title, runs, verdicts, ranks)}<main>{sweep}{sections}</main>"
            # Plots drawn before the grid settled its widths are refitted once loaded.
            '<script>window.addEventListener("load",()=>document.querySelectorAll('
            '".js-plotly-plot").forEach(g=>Plotly.Plots.resize(g)));</script>'
            "</body></html>\n")


def write_report(records: list[dict], path: str | os.PathLike[str], profile: Profile,
                 ranks: dict | None = None, title: str | None = None) -> None:
    """Render and write atomically: a reader never sees half a report."""
    text = render_report(records, profile, ranks=ranks, title=title)
    target = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(target))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".report-", suffix=".html.tmp", dir=directory)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; a report is for sharing
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
