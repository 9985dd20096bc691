"""The seed's wandb dashboard: the plain spec, and the wandb_workspaces objects built from it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from collector.analysis.profile_load import load_profile
from collector.report import dashboard
from collector.report.dashboard import (
    WorkspaceError,
    build_workspace,
    create_workspace,
    workspace_spec,
)

REPO = Path(dashboard.__file__).parent.parent  # the tree the collector package is in


def _panels(spec: dict) -> dict[str, dict]:
    return {p["title"]: p for s in spec["sections"] for p in s["panels"]}


def test_spec_holds_the_seeds_four_panels() -> None:
    spec = workspace_spec("gait", "team")
    assert (spec["project"], spec["entity"]) == ("gait", "team")
    names = [s["name"] for s in spec["sections"]]
    assert names == ["1. Training health", "2. Validation quality",
                     "3. Mode-collapse detection", "4. Loss components", "5. Per-step curves"]
    assert spec["x_axis"] == "epoch"  # the sink's step metric, not wandb's row counter
    steps = [p for s in spec["sections"] if s["name"] == "5. Per-step curves"
             for p in s["panels"]]
    assert [(p["metrics"], p["x"]) for p in steps] == [
        (["steps/loss", "steps/loss_max"], "trainer_step"),
        (["steps/grad_norm", "steps/grad_norm_max"], "trainer_step")]
    by_section = {s["name"]: [(p["kind"], p["metrics"]) for p in s["panels"]]
                  for s in spec["sections"]}
    assert by_section["1. Training health"] == [
        ("line", ["train/total_loss"]), ("line", ["train/grad_norm_mean"]),
        ("bar", ["train/is_improving"])]
    assert by_section["3. Mode-collapse detection"] == [
        ("line", ["train/batch_loss_cv"]), ("line", ["validation/gen_std"]),
        ("line", ["model/ema_diff"])]
    validation = by_section["2. Validation quality"]
    assert ("line", ["validation/knee_r_std", "threshold/knee_r_std"]) in validation
    assert ("line", ["validation/grf_vz_r_std", "threshold/grf_vz_r_std"]) in validation
    assert ("bar", ["validation/knee_healthy", "validation/grf_healthy"]) in validation
    (kind, metrics), = by_section["4. Loss components"]
    assert kind == "stacked_area"
    assert set(metrics) == {f"loss_ratio/{n}" for n in ("simple", "vel", "fk", "drift", "slide")}


def test_threshold_series_are_the_seeds_thresholds_and_are_plotted() -> None:
    THRESHOLD_SERIES = load_profile(None).thresholds  # noqa: N806 - the profile's, one place
    assert THRESHOLD_SERIES == {"threshold/knee_r_std": 0.1, "threshold/grf_vz_r_std": 10.0}
    plotted = {m for p in _panels(workspace_spec("p")).values() for m in p["metrics"]}
    assert set(THRESHOLD_SERIES) <= plotted
    assert workspace_spec("p")["entity"] is None


def test_spec_refuses_an_empty_project() -> None:
    with pytest.raises(ValueError, match="project"):
        workspace_spec("")


def test_workspace_objects_build_from_the_spec_offline() -> None:
    ws = pytest.importorskip("wandb_workspaces.workspaces")
    wr = pytest.importorskip("wandb_workspaces.reports.v2")
    spec = workspace_spec("gait", "team")
    workspace = build_workspace(spec)
    assert isinstance(workspace, ws.Workspace)
    assert (workspace.entity, workspace.project) == ("team", "gait")
    assert [s.name for s in workspace.sections] == [s["name"] for s in spec["sections"]]
    panels = {p.title: p for s in workspace.sections for p in s.panels}
    assert set(panels) == set(_panels(spec))
    knee = panels["validation/knee_r_std (threshold 0.1 rad)"]
    assert isinstance(knee, wr.LinePlot) and "threshold/knee_r_std" in knee.y
    assert isinstance(panels["train/is_improving"], wr.BarPlot)
    assert panels["loss_ratio/*"].plot_type == "stacked-area"
    # The wire model wandb would receive serialises without a network.
    wire = workspace._to_model().model_dump_json(by_alias=True)
    assert "validation/grf_vz_r_std" in wire and "threshold/grf_vz_r_std" in wire
    curve = panels["loss per step (bucket mean and max)"]
    assert curve.x == "trainer_step" and knee.x == "epoch"


def test_workspace_needs_an_entity() -> None:
    pytest.importorskip("wandb_workspaces")
    with pytest.raises(ValueError, match="entity"):
        build_workspace(workspace_spec("gait", None))


def test_create_workspace_refuses_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(WorkspaceError, match="online"):
        create_workspace("gait", "team")


def test_create_workspace_without_an_api_key_says_so(tmp_path: Path) -> None:
    # A fresh interpreter with an empty home: no netrc, no settings, no key.
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(tmp_path), NETRC=str(tmp_path / "netrc"),
               WANDB_CONFIG_DIR=str(tmp_path / "wandb"), PYTHONPATH=str(REPO))
    code = ("from collector.report.dashboard import create_workspace, WorkspaceError\n"
            "try:\n    create_workspace('gait', 'team')\n"
            "except WorkspaceError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                         stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("ERR"), out.stdout + out.stderr
    assert "API key" in out.stdout
