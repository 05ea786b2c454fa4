"""Schedules: validation, JSON interchange, subsets and MACs; the authors' router files."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from l2c_export.core.schedule import Schedule, ScheduleError
from l2c_export.models.dit import count_macs
from l2c_export.models.dit.model import dit_config
from l2c_export.routers import RouterError, RouterLogits, load_router, save_router


def _write(tmp_path, data, name="schedule.json"):
    path = tmp_path / name
    path.write_text(json.dumps(data))
    return path


def test_a_schedule_round_trips_through_json(tmp_path):
    rows = [[1, 1, 1, 1], [1, 0, 0, 1], [1, 1, 1, 1], [1, 0, 0, 1]]
    schedule = Schedule(np.array(rows, dtype=bool), timesteps=[999, 666, 333, 0], source="hand", threshold=0.2)
    schedule.save(tmp_path / "s.json")
    again = Schedule.load(tmp_path / "s.json")
    assert again.compute.astype(int).tolist() == rows
    assert (again.timesteps, again.threshold, again.depth, again.num_steps) == ([999, 666, 333, 0], 0.2, 2, 4)
    assert again.distinct_subsets() == [(True,) * 4, (True, False, False, True)]
    assert again.subset_of_step() == [0, 1, 0, 1]


@pytest.mark.parametrize("data,message", [
    ({"num_steps": 2, "depth": 1, "compute": [[1, 0], [1, 1]]},
     "field 'compute' row 0 (the first step) must compute every sub-layer"),
    ({"num_steps": 2, "depth": 2, "compute": [[1, 1, 1, 1], [1, 1, 1]]},
     "field 'compute' row 1 must have 2 * depth = 4 entries; got 3"),
    ({"num_steps": 3, "depth": 1, "compute": [[1, 1], [1, 1]]}, "field 'compute' must have num_steps = 3 rows; got 2"),
    ({"num_steps": 1, "depth": 1, "compute": [[1, 2]]}, "must hold only 0 or 1; got 2"),
    ({"num_steps": 1, "depth": 1, "compute": [[1, 0.5]]}, "must hold only 0 or 1; got 0.5"),
    ({"num_steps": 1, "compute": [[1, 1]]}, "expected exactly one of the fields 'depth'"),
    ({"num_steps": 0, "depth": 1, "compute": []}, "field 'num_steps' must be a positive integer"),
    ({"num_steps": 1, "depth": 1, "compute": [[1, 1]], "timesteps": [1, 2]}, "field 'timesteps' has 2 entries"),
])
def test_invalid_schedules_fail_naming_file_and_field(tmp_path, data, message):
    path = _write(tmp_path, data)
    with pytest.raises(ScheduleError) as info:
        Schedule.load(path)
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_a_schedule_file_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text("{nope")
    with pytest.raises(ScheduleError, match="broken.json: not valid JSON"):
        Schedule.load(path)


def test_schedule_must_fit_sampler_and_model():
    schedule = Schedule.full(20, 12, source="s.json")
    schedule.check_fits(20, 12)
    with pytest.raises(ScheduleError, match="s.json: field 'num_steps' is 20; the sampler takes 50 steps"):
        schedule.check_fits(50, 12)
    with pytest.raises(ScheduleError, match="field 'depth' is 12; the model has 28 blocks"):
        schedule.check_fits(20, 28)


def test_macs_of_dit_xl2_match_the_papers_gflops():
    macs = count_macs(dit_config("DiT-XL/2", input_size=32))
    assert macs.full / 1e9 == pytest.approx(118.6, abs=0.3)
    # A block's MLP costs 8 T D^2, its attention 4 T D^2 + 2 T^2 D.
    assert macs.mlp == 8 * 256 * 1152 ** 2
    assert macs.attn == 4 * 256 * 1152 ** 2 + 2 * 256 ** 2 * 1152


def test_mac_fraction_counts_the_parts_that_always_run():
    macs = count_macs(dit_config("DiT-S/2", input_size=32))
    rows = np.ones((2, 24), dtype=bool)
    rows[1] = False
    rows[1, 0] = True
    fraction = Schedule(np.vstack([np.ones((1, 24), bool), rows[1:]])).mac_fraction(macs)
    expected = (macs.full + macs.always + macs.attn) / (2 * macs.full)
    assert fraction == pytest.approx(expected)
    assert Schedule.full(3, 12).mac_fraction(macs) == 1.0


# --------------------------------------------------------------------------------------------------------------------
def test_the_authors_ddim20_router_decodes_to_312_of_560(authors_router):
    router = load_router(authors_router)
    assert router.logits.shape == (20, 56)
    assert router.meta["model"] == "DiT-XL/2" and router.meta["image_size"] == 256
    schedule = router.to_schedule(0.1)
    cache_steps = [s for s in range(20) if s % 2 == 1]
    assert all(schedule.compute[s].all() for s in range(0, 20, 2))  # odd router index: compute everything
    assert int(schedule.compute[cache_steps].sum()) == 312
    # Step s uses router index 19 - s: the first cache step (s = 1) is the file's '18.prob'.
    raw = torch.load(authors_router, weights_only=False, map_location="cpu")["routers"]
    np.testing.assert_array_equal(schedule.compute[1], torch.sigmoid(raw["18.prob"]).numpy() > 0.1)
    np.testing.assert_array_equal(router.logits[19], raw["0.prob"].numpy())


def test_general_mode_lets_every_step_after_the_first_reuse(authors_router):
    router = load_router(authors_router)
    general = router.to_schedule(0.1, mode="general")
    assert general.compute[0].all()
    np.testing.assert_array_equal(general.compute[1:], router.probabilities()[1:] > 0.1)
    official = router.to_schedule(0.1)
    np.testing.assert_array_equal(general.compute[1::2], official.compute[1::2])


def test_router_round_trips_through_safetensors(tmp_path):
    logits = np.random.default_rng(0).normal(size=(6, 8)).astype(np.float32)
    save_router(RouterLogits(logits, source="learned"), tmp_path / "r.safetensors", {"model": "DiT-S/2"})
    again = load_router(tmp_path / "r.safetensors")
    np.testing.assert_array_equal(again.logits, logits)
    assert again.meta["model"] == "DiT-S/2"


def test_a_router_file_of_the_wrong_shape_fails_clearly(tmp_path):
    path = tmp_path / "bad_router.pt"
    torch.save({"routers": {"0.prob": torch.zeros(4), "2.prob": torch.zeros(4)}}, path)
    with pytest.raises(RouterError, match=r"bad_router.pt: field 'routers' must hold indices 0..1"):
        load_router(path)
    torch.save({"something": 1}, path)
    with pytest.raises(RouterError, match="expected a dict with field 'routers'"):
        load_router(path)
