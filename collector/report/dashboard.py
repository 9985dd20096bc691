"""The seed's recommended wandb dashboard, as data and as a saved wandb workspace.

``workspace_spec`` is plain data (tested offline); ``create_workspace`` turns it into
``wandb_workspaces`` objects and saves them, which needs the network and an API key::

    url = create_workspace("gait-diffusion", entity="my-team")

wandb panels have no threshold option, so the records carry the profile's thresholds
(``threshold/*``) as constant series beside the validation metrics, and the validation
panel plots them as lines.
"""

from __future__ import annotations

import os
from typing import Any

from collector.analysis.profile import Profile
from collector.analysis.profile_load import load_profile

__all__ = ["WorkspaceError", "X_AXIS", "create_workspace", "build_workspace",
           "workspace_spec"]

# The wandb sink defines "epoch" as every epoch metric's step metric (wandb's own step is a
# row counter once the per-step curve's rows take steps); that curve's axis is its own.
X_AXIS = "epoch"
STEP_X_AXIS = "trainer_step"
WORKSPACE_NAME = "trainwatch: training health"

Panel = dict[str, Any]


def _line(title: str, *metrics: str, x: str | None = None) -> Panel:
    out: Panel = {"kind": "line", "title": title, "metrics": list(metrics)}
    if x is not None:
        out["x"] = x  # the panel's own axis, not the workspace's
    return out


def _bar(title: str, *metrics: str) -> Panel:
    # A wandb bar panel shows each run's latest value: the seed's "last value = 1" check.
    return {"kind": "bar", "title": title, "metrics": list(metrics)}


def workspace_spec(project: str, entity: str | None = None,
                   profile: Profile | None = None) -> dict[str, Any]:
    """The seed's four dashboard panels as sections of a wandb workspace (plain data), and
    the per-step curves (``steps/*`` against ``trainer_step``).

    Each section holds panels of kind ``line``, ``bar`` or ``stacked_area``; ``metrics``
    are exact wandb keys, ``metric_regex`` (stacked area) matches a key family. The
    thresholds and loss terms are the profile's (default: the packaged one).
    """
    if not project:
        raise ValueError("workspace_spec needs a project name")
    profile = profile if profile is not None else load_profile(None)
    th = profile.thresholds
    validation = [_line(f"validation/{key}_std (threshold {th[f'threshold/{key}_std']:g} "
                        f"{unit})", f"validation/{key}_std", f"threshold/{key}_std")
                  for key, unit in (("knee_r", "rad"), ("grf_vz_r", "N"))
                  if f"threshold/{key}_std" in th]
    flags = [f"validation/{k}_healthy" for k, ch in (("knee", profile.knee_channel),
                                                      ("grf", profile.grf_channel)) if ch]
    if flags:
        validation.append(_bar(" and ".join(f.split("/")[1] for f in flags), *flags))
    sections = [
        {"name": "1. Training health", "panels": [
            _line("train/total_loss", "train/total_loss"),
            _line("train/grad_norm_mean", "train/grad_norm_mean"),
            _bar("train/is_improving", "train/is_improving"),
        ]},
        {"name": "2. Validation quality", "panels": validation},
        {"name": "3. Mode-collapse detection", "panels": [
            _line("train/batch_loss_cv", "train/batch_loss_cv"),
            _line("validation/gen_std", "validation/gen_std"),
            _line("model/ema_diff", "model/ema_diff"),
        ]},
        {"name": "4. Loss components", "panels": [
            {"kind": "stacked_area", "title": "loss_ratio/*",
             "metrics": [f"loss_ratio/{name}" for name in profile.loss_terms],
             "metric_regex": "^loss_ratio/.*"},
        ]},
        {"name": "5. Per-step curves", "panels": [
            _line("loss per step (bucket mean and max)", "steps/loss", "steps/loss_max",
                  x=STEP_X_AXIS),
            _line("gradient norm per step (bucket mean and max)", "steps/grad_norm",
                  "steps/grad_norm_max", x=STEP_X_AXIS),
        ]},
    ]
    return {"entity": entity, "project": project, "name": WORKSPACE_NAME,
            "x_axis": X_AXIS, "thresholds": th, "sections": sections}


def build_workspace(spec: dict[str, Any]) -> Any:
    """``wandb_workspaces`` objects for ``spec``, built without touching the network.

    Raises ``ValueError`` when the spec has no entity (wandb needs one to save).
    """
    import wandb_workspaces.reports.v2 as wr
    import wandb_workspaces.workspaces as ws

    if not spec.get("entity"):
        raise ValueError("a wandb workspace needs an entity; pass entity= or log in")

    def panel(p: Panel) -> Any:
        if p["kind"] == "bar":
            return wr.BarPlot(title=p["title"], metrics=list(p["metrics"]), orientation="v")
        plot_type = "stacked-area" if p["kind"] == "stacked_area" else "line"
        # The regex picks up component names a profile adds beyond the seed's five.
        return wr.LinePlot(title=p["title"], x=p.get("x", spec["x_axis"]), y=list(p["metrics"]),
                           plot_type=plot_type, metric_regex=p.get("metric_regex"))

    sections = [
        ws.Section(name=s["name"], panels=[panel(p) for p in s["panels"]], is_open=True,
                   layout_settings=ws.SectionLayoutSettings(columns=len(s["panels"]), rows=1))
        for s in spec["sections"]
    ]
    return ws.Workspace(entity=spec["entity"], project=spec["project"], name=spec["name"],
                        sections=sections,
                        settings=ws.WorkspaceSettings(x_axis=spec["x_axis"]))


class WorkspaceError(RuntimeError):
    """The workspace could not be created (offline, not logged in, or rejected by wandb)."""


def create_workspace(project: str, entity: str | None = None,
                     profile: Profile | None = None) -> str:
    """Save the seed's dashboard as a wandb workspace of ``project``; returns its URL.

    Needs the network and a wandb API key (``wandb login`` or ``WANDB_API_KEY``).
    """
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "disabled", "dryrun"):
        raise WorkspaceError(
            "creating a wandb workspace needs wandb online; WANDB_MODE is "
            f"{os.environ['WANDB_MODE']!r}")
    try:
        import wandb
        import wandb_workspaces  # noqa: F401
    except ImportError as exc:
        raise WorkspaceError(
            "creating a wandb workspace needs the wandb-workspaces package "
            "(pip install wandb-workspaces)") from exc
    try:
        api = wandb.Api()
        entity = entity or api.default_entity
    except Exception as exc:  # UsageError without a key, network errors without a network
        raise WorkspaceError(
            "creating a wandb workspace needs a wandb API key and the network "
            f"(run `wandb login` or set WANDB_API_KEY): {exc}") from exc
    workspace = build_workspace(workspace_spec(project, entity, profile))
    try:
        workspace.save()
        return str(workspace.url)
    except Exception as exc:
        raise WorkspaceError(f"wandb rejected the workspace for {entity}/{project}: {exc}") \
            from exc
