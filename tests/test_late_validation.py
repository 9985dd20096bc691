"""``log_validation(E)`` after ``log_epoch(E)`` (the loop's natural order) is judged as
epoch E's: the same figures and flags as validating first, for every epoch, both orders
replayed byte for byte (real 2-rank jobs through real collector processes)."""

from __future__ import annotations

import json
import math

import pytest
from conftest import CollectorProc, by_epoch, finish, replayed_jsonl, start_trainer

EPOCHS = 4


def _job(tmp, name: str, after: bool) -> tuple[CollectorProc, list[dict]]:
    col = CollectorProc(tmp, f"ipc://{tmp}/{name}.sock", "--once", "--quiet", "1",
                        name=name).start()
    order = {"validate_after": True} if after else {"validate": True}
    procs = [start_trainer(col.endpoint, "job", r, 2, tmp / f"{name}{r}.json", epochs=EPOCHS,
                           steps=12, **order) for r in range(2)]
    finish(procs)
    assert col.wait(120) == 0, col.log.read_text()[-3000:]
    return col, col.records()


@pytest.fixture(scope="module")
def both(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("late")
    return {after: _job(tmp, "after" if after else "first", after) for after in (False, True)}


def test_late_samples_amend_their_own_epoch(both):
    _, recs = both[True]
    amends = [r for r in recs if r["type"] == "epoch" and r.get("amends")]
    # each epoch closes once both ranks closed it; each rank's samples then come late
    assert sorted({r["epoch"] for r in amends}) == list(range(1, EPOCHS + 1))
    for r in amends:
        assert "validation/gen_std" in r["metrics"] and "health/gen_std_low" in r["metrics"]
    originals = [r for r in recs if r["type"] == "epoch" and not r.get("amends")]
    assert [r["epoch"] for r in originals] == list(range(1, EPOCHS + 1))


def test_both_orders_give_the_same_figures_for_every_epoch(both):
    first, after = by_epoch(both[False][1]), by_epoch(both[True][1])
    assert sorted(first) == sorted(after) == list(range(1, EPOCHS + 1))
    for epoch in first:
        assert set(first[epoch]) == set(after[epoch]), epoch
        for key, value in first[epoch].items():
            other = after[epoch][key]
            if value is None or other is None:
                assert value == other, (epoch, key)
            else:  # the ranks' samples pool in arrival order: equal to rounding
                assert math.isclose(value, other, rel_tol=1e-9, abs_tol=1e-12), (epoch, key)
    s_first = next(r for r in both[False][1] if r["type"] == "summary")["metrics"]
    s_after = next(r for r in both[True][1] if r["type"] == "summary")["metrics"]
    assert s_first.keys() == s_after.keys()
    assert "summary/final_knee_healthy" in s_first
    for key, value in s_first.items():  # first_knee_healthy_epoch and the rest agree
        assert math.isclose(value, s_after[key], rel_tol=1e-9), key


@pytest.mark.parametrize("after", [False, True])
def test_replay_of_either_order_equals_live(both, after, tmp_path):
    col, _ = both[after]
    replayed = replayed_jsonl(col.record, tmp_path)
    assert replayed == col.jsonl.read_bytes()
    assert all(json.loads(line)["run"] == "job" for line in replayed.decode().splitlines())
