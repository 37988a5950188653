"""runtime/scheduler.py against diffusers' FlowMatchEulerDiscreteScheduler as FluxPipeline drives it.

Everything is float32 computed with the same expressions in the same order, so the comparison
is exact (bitwise), not within a tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift as diffusers_calculate_shift
from diffusers.pipelines.flux.pipeline_flux import retrieve_timesteps

from deleaker.runtime.scheduler import (FLUX_DEV_SCHEDULER_CONFIG, FlowMatchEuler, SchedulerError,
                                        calculate_shift, euler_update)

SCHNELL_CONFIG = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 1.0}


def diffusers_schedule(config: dict, num_steps: int, image_seq_len: int, sigmas=None):
    """What FluxPipeline.__call__ does (step 5, 'Prepare timesteps')."""
    sched = FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = np.linspace(1.0, 1 / num_steps, num_steps) if sigmas is None else sigmas
    mu = diffusers_calculate_shift(image_seq_len, sched.config.get("base_image_seq_len", 256),
                                   sched.config.get("max_image_seq_len", 4096), sched.config.get("base_shift", 0.5),
                                   sched.config.get("max_shift", 1.15))
    timesteps, _ = retrieve_timesteps(sched, num_steps, "cpu", sigmas=sigmas, mu=mu)
    sched.set_begin_index(0)
    return sched, timesteps


@pytest.mark.parametrize("num_steps", [4, 20, 28])
@pytest.mark.parametrize("image_size", [512, 1024])
def test_schedule_and_steps_match_diffusers_flux_dev(num_steps, image_size):
    seq = (image_size // 16) ** 2
    ref, ref_t = diffusers_schedule(FLUX_DEV_SCHEDULER_CONFIG, num_steps, seq)
    ours = FlowMatchEuler.from_config(FLUX_DEV_SCHEDULER_CONFIG)
    plan = ours.schedule(num_steps, seq)
    sigmas, timesteps = plan.sigmas, plan.timesteps

    assert sigmas.dtype == np.float32 and timesteps.dtype == np.float32
    assert sigmas.shape == (num_steps + 1,) and timesteps.shape == (num_steps,)
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, ref_t.numpy())
    assert sigmas[0] == 1.0 and sigmas[-1] == 0.0 and np.all(np.diff(sigmas) < 0)

    g = torch.Generator().manual_seed(num_steps)
    x_ref = torch.randn(1, seq // 16, 64, generator=g)  # a slice of the packed latents is enough
    x = x_ref.numpy().copy()
    xt = x_ref.clone()  # the same loop on torch tensors (the torch and aoti backends' arrays)
    tables = plan.tables(2)  # what every backend's session moves to its device
    assert tables["timestep"].shape == (num_steps, 2) and tables["dt"].dtype == np.float32
    np.testing.assert_array_equal(tables["step"], np.arange(num_steps))
    dts = torch.from_numpy(tables["dt"])
    for i, t in enumerate(ref_t):
        v = torch.randn(x_ref.shape, generator=g)
        # the transformer's timestep input: FluxPipeline feeds t.expand(B).to(float32) / 1000
        np.testing.assert_array_equal(tables["timestep"][i], (t.expand(2).to(torch.float32) / 1000).numpy())
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x = euler_update(x, tables["dt"][i], v.numpy())
        xt = euler_update(xt, dts[i], v)
        np.testing.assert_array_equal(x, x_ref.numpy(), err_msg=f"step {i}")
        np.testing.assert_array_equal(xt.numpy(), x_ref.numpy(), err_msg=f"step {i} (torch)")


def test_dynamic_shift_depends_on_resolution():
    s = FlowMatchEuler.flux_dev()
    small, _ = s.timesteps(20, 256)
    large, _ = s.timesteps(20, 4096)
    assert np.all(large[1:-1] > small[1:-1])  # more tokens: more time at high noise
    assert s.mu(256) == pytest.approx(0.5) and s.mu(4096) == pytest.approx(1.15)
    assert calculate_shift(1024) == diffusers_calculate_shift(1024)


@pytest.mark.parametrize("num_steps", [1, 4])
def test_schnell_static_shift_matches_diffusers(num_steps):
    ref, ref_t = diffusers_schedule(SCHNELL_CONFIG, num_steps, 4096)
    sigmas, timesteps = FlowMatchEuler.from_config(SCHNELL_CONFIG).timesteps(num_steps, 4096)
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, ref_t.numpy())


def test_static_shift_3_and_custom_sigmas_match_diffusers():
    cfg = {**FLUX_DEV_SCHEDULER_CONFIG, "use_dynamic_shifting": False}
    ref, ref_t = diffusers_schedule(cfg, 10, 1024)
    np.testing.assert_array_equal(FlowMatchEuler.from_config(cfg).timesteps(10, 1024)[0], ref.sigmas.numpy())
    custom = [1.0, 0.8, 0.5, 0.3, 0.1]
    ref, ref_t = diffusers_schedule(FLUX_DEV_SCHEDULER_CONFIG, 5, 1024, sigmas=custom)
    sigmas, timesteps = FlowMatchEuler.flux_dev().timesteps(5, 1024, sigmas=custom)
    np.testing.assert_array_equal(sigmas, ref.sigmas.numpy())
    np.testing.assert_array_equal(timesteps, ref_t.numpy())


def test_linear_time_shift_matches_diffusers():
    cfg = {**FLUX_DEV_SCHEDULER_CONFIG, "time_shift_type": "linear"}
    ref, ref_t = diffusers_schedule(cfg, 8, 1024)
    np.testing.assert_array_equal(FlowMatchEuler.from_config(cfg).timesteps(8, 1024)[0], ref.sigmas.numpy())


def test_config_round_trip_and_ignored_keys():
    s = FlowMatchEuler.from_config({**FLUX_DEV_SCHEDULER_CONFIG, "_diffusers_version": "0.30.0", "future_knob": 1})
    assert s.config.shift == 3.0 and s.config.use_dynamic_shifting
    assert FlowMatchEuler.from_config(s.config.to_dict()).config == s.config
    assert FlowMatchEuler.from_config({}).config.shift == 1.0  # diffusers' defaults


@pytest.mark.parametrize("bad, match", [
    ({"_class_name": "EulerDiscreteScheduler"}, "EulerDiscreteScheduler"),
    ({"use_karras_sigmas": True}, "use_karras_sigmas"),
    ({"shift_terminal": 0.1}, "shift_terminal"),
    ({"invert_sigmas": True}, "invert_sigmas"),
    ({"stochastic_sampling": True}, "stochastic_sampling"),
    ({"time_shift_type": "cosine"}, "time_shift_type"),
])
def test_unsupported_configs_are_clear_errors(bad, match):
    with pytest.raises(SchedulerError, match=match):
        FlowMatchEuler.from_config({**FLUX_DEV_SCHEDULER_CONFIG, **bad})


def test_call_errors():
    s = FlowMatchEuler.flux_dev()
    for bad in (0, -3, 2.5, True):
        with pytest.raises(SchedulerError, match="num_steps"):
            s.timesteps(bad, 1024)
    with pytest.raises(SchedulerError, match="image_seq_len"):
        s.timesteps(4, 0)
    with pytest.raises(SchedulerError, match="3 sigmas for 4 steps"):
        s.timesteps(4, 1024, sigmas=[1.0, 0.5, 0.2])


def test_schedules_are_values():
    """One scheduler, two interleaved schedules: neither disturbs the other (no state on the instance)."""
    s = FlowMatchEuler.flux_dev()
    a, b = s.schedule(4, 1024), s.schedule(20, 256)
    np.testing.assert_array_equal(a.sigmas, s.schedule(4, 1024).sigmas)
    assert a.num_steps == 4 and b.num_steps == 20 and a.model_timesteps()[3] != b.model_timesteps()[3]
