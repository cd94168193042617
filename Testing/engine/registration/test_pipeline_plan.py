"""The per-level iteration plan (``RegistrationConfig.large_grid_voxels``): above the cap each stage's work is
limited, the finest levels give way first, the plan reports what ran, and grids below the cap are as they were."""
from __future__ import annotations

import math

import numpy as np
import pytest

from DeepRegistrationLib.core.config import DEFAULT_LARGE_GRID_VOXELS, RegistrationConfig
from DeepRegistrationLib.core.errors import InputError
from DeepRegistrationLib.registration import pipeline


def cfg(**kw) -> RegistrationConfig:
    return RegistrationConfig(**{"spacing": 4.0, "threads": 2, **kw})


@pytest.fixture()
def counted_steps(monkeypatch):
    """The optimizer steps each level really took, in order (the pipeline's own optimizer, counted)."""
    runs: list[list] = []

    class Counting(pipeline.CosineAdam):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            runs.append([0])

        def step(self):
            runs[-1][0] += 1
            return super().step()

    monkeypatch.setattr(pipeline, "CosineAdam", Counting)
    return runs


def test_a_small_cap_cuts_the_finest_levels_first(sample_pair, counted_steps):
    fixed, moving, _, _ = sample_pair
    cap = 0.02  # M voxels: the 4 mm working grid (~85 k voxels) is "large"
    res = pipeline.register(fixed, moving, cfg(large_grid_voxels=cap, initialization="moments"))
    plan = res.plan
    assert [(e["stage"], e["factor"]) for e in plan] == [("linear", 4), ("linear", 2), ("deformable", 4),
                                                         ("deformable", 2), ("deformable", 1)]
    assert [e["planned"] for e in plan] == [60, 30, 20, 20, 10]
    finest = int(np.prod(res.working_grid.shape))
    assert finest == plan[-1]["voxels"] > cap * 1e6
    for stage in ("linear", "deformable"):
        levels = [e for e in plan if e["stage"] == stage]
        budget = cap * 1e6 / finest * sum(e["planned"] * e["voxels"] for e in levels)
        work = [e["iterations"] * e["voxels"] for e in levels]
        assert sum(work) <= budget
        assert levels[0]["iterations"] >= 1
        # coarse to fine: a level is cut only once the coarser ones have taken what they planned
        cut = [e["iterations"] < e["planned"] for e in levels]
        assert cut[-1] and cut == sorted(cut)
        for n, (e, w_before) in enumerate(zip(levels, np.cumsum([0] + work[:-1]))):
            share = min(e["planned"], math.floor((budget - w_before) / e["voxels"]))
            # a finer level left under MIN_LEVEL_SHARE of its plan does not run at all
            small = n > 0 and share < pipeline.MIN_LEVEL_SHARE * e["planned"]
            assert e["iterations"] == (0 if small else share)
    # the steps the optimizers took are the reported plan (levels left with 0 iterations do not run)
    assert [n for (n,) in counted_steps] == [e["iterations"] for e in plan if e["iterations"] > 0]
    assert res.similarity_after < res.similarity_before


def test_no_limit_and_the_default_leave_a_small_pair_as_it_was(sample_pair):
    fixed, moving, _, _ = sample_pair
    unlimited = pipeline.register(fixed, moving, cfg(large_grid_voxels=0))
    default = pipeline.register(fixed, moving, cfg())
    assert RegistrationConfig().large_grid_voxels == DEFAULT_LARGE_GRID_VOXELS > 0
    for res in (unlimited, default):
        assert all(e["iterations"] == e["planned"] for e in res.plan)
    np.testing.assert_array_equal(default.transform.affine, unlimited.transform.affine)
    np.testing.assert_array_equal(default.transform.field, unlimited.transform.field)
    assert default.similarity_after == unlimited.similarity_after


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "10"])
def test_bad_caps_name_the_option(bad):
    with pytest.raises(InputError, match="large_grid_voxels"):
        RegistrationConfig(large_grid_voxels=bad).validate()


def test_the_cap_is_a_reported_setting():
    assert RegistrationConfig(large_grid_voxels=8).validate().to_dict()["large_grid_voxels"] == 8


def test_a_level_left_a_small_share_of_its_plan_does_not_run():
    planned = {4: 20, 2: 20, 1: 10}
    finest = 4_600_000  # the 2 mm trunk CT of benchmarks/large_fov.py
    voxels = {4: 73_416, 2: 580_944, 1: finest}
    plan = pipeline._stage_plan("deformable", planned, voxels, finest, RegistrationConfig())
    # the budget leaves the finest level 1 of its 10 iterations: under a quarter, so none
    budget = 1.5e6 / finest * sum(planned[f] * voxels[f] for f in planned)
    assert math.floor((budget - 20 * voxels[4] - 20 * voxels[2]) / finest) == 1
    assert plan == {4: 20, 2: 20, 1: 0}
    # three of ten (at least a quarter) still run
    roomy = pipeline._stage_plan("deformable", planned, voxels, finest, RegistrationConfig(large_grid_voxels=3.0))
    assert roomy[1] >= pipeline.MIN_LEVEL_SHARE * 10 and roomy[1] > 0
    linear = pipeline._stage_plan("linear", {4: 60, 2: 30}, {4: 73_416, 2: 580_944}, finest, RegistrationConfig())
    assert linear == {4: 60, 2: 0}  # 4 of 30 at 4 mm before


def test_a_finer_spacing_keeps_its_iterations_over_the_same_field_of_view():
    planned = {4: 20, 2: 20, 1: 10}
    n = 2_500_000  # a brain at 1.5 mm
    voxels = {4: n // 64, 2: n // 8, 1: n}
    at_default = pipeline._stage_plan("deformable", planned, voxels, n, RegistrationConfig())
    assert at_default[4] == 20 and at_default[1] < 10
    assert pipeline._stage_plan("deformable", planned, voxels, n, RegistrationConfig(spacing=1.5)) == planned
    assert RegistrationConfig(spacing=1.5).large_grid_cap() == pytest.approx(1.5e6 * (2 / 1.5) ** 3)
    assert RegistrationConfig(spacing=3.0).large_grid_cap() == 1.5e6  # coarser: the default cap
    assert RegistrationConfig(large_grid_voxels=0).large_grid_cap() == math.inf
    big = 40 * n  # a grid so large that the coarse levels alone exceed the cap: the coarsest still runs once
    few = pipeline._stage_plan("deformable", planned, {f: big // f ** 3 for f in planned}, big, RegistrationConfig())
    assert few[4] >= 1 and few[1] == 0


@pytest.mark.parametrize("kind", ["diffeomorphic", "symmetric"])
def test_a_left_out_finest_level_carries_the_coarser_velocity(sample_pair, counted_steps, kind):
    fixed, moving, _, _ = sample_pair
    res = pipeline.register(fixed, moving, cfg(large_grid_voxels=0.02, initialization="moments", **{kind: True}))
    finest = [e for e in res.plan if e["stage"] == "deformable"][-1]
    assert finest["factor"] == 1 and finest["iterations"] == 0 < finest["planned"]
    assert [n for (n,) in counted_steps] == [e["iterations"] for e in res.plan if e["iterations"] > 0]
    assert res.velocity is not None and res.velocity.shape == res.transform.field.shape
    assert res.similarity_after < res.similarity_before and res.folding_percent == 0.0
