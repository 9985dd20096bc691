"""What the wandb sink logs of the views' records: the per-step curve's rows and the
pictures of samples as plotly figures. Called on the sink's thread only::

    define_step_axes(run)                      # once per wandb run, before the first row
    for row in step_rows(step_curve_record):   # {"trainer_step": 17, "steps/loss": ...}
        run.log(row, step=next_step)
    key, value = picture_entry(picture_record) # "pictures/gait", a wandb.Plotly
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from collector.records import SamplesPictureRecord, StepCurveRecord, StepPoint

__all__ = ["STEP_AXIS", "STEP_METRICS", "define_step_axes", "picture_entry", "step_rows"]

STEP_AXIS = "trainer_step"  # the per-step curve's x axis
STEP_METRICS = tuple(f"steps/{name}" for name in StepPoint._fields[1:])  # against it


def define_step_axes(run: Any) -> None:
    """steps/<name> against trainer_step, each by its exact name: a glob ("steps/*") would
    overlap the epoch rows' "*", which wandb-core resolves either way, run to run; under
    "*" a step row would get "epoch" (wandb copies the step metric into a row), which only
    epoch rows have."""
    run.define_metric(STEP_AXIS)
    for name in STEP_METRICS:
        run.define_metric(name, step_metric=STEP_AXIS)


def step_rows(record: StepCurveRecord) -> Iterator[dict[str, Any]]:
    """One row per point: its first step on the curve's axis, its figures (None left out)."""
    for p in record.points:
        row: dict[str, Any] = {STEP_AXIS: p.step}
        row.update({k: v for k, v in zip(STEP_METRICS, p[1:], strict=True) if v is not None})
        yield row


def picture_entry(record: SamplesPictureRecord) -> tuple[str, Any]:
    """The picture's key and its figure as a ``wandb.Plotly`` (no browser, no image
    library: the figure's JSON, which wandb draws)."""
    import wandb

    from collector.report.pictures import picture_figure

    fig = picture_figure(record.kind, record.picture, record.epoch)
    return f"pictures/{record.kind}", wandb.Plotly(fig)
