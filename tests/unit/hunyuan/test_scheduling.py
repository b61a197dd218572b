"""Pins the official HunyuanVideo-Avatar sampling schedule (facts §2.10–§2.12)."""

import pytest
import torch

from avatar_model.hunyuan.scheduling import (
    WindowPlan,
    cached_steps,
    euler_step,
    face_mask_scale,
    flow_match_scheduler,
    flow_sigmas,
    guidance_scale,
    uses_text_cfg,
)

OFFICIAL_FULL_50 = [*range(0, 16), 20, 25, 30, 35, *range(40, 50)]
OFFICIAL_CACHED_50 = [*range(16, 20), *range(21, 25), *range(26, 30), *range(31, 35), *range(36, 40)]


# ----------------------------------------------------------------------------------------------- sigmas


@pytest.mark.parametrize("n", [1, 4, 30, 50])
def test_sigmas_are_shifted_linspace(n):
    sigmas, timesteps = flow_sigmas(n)
    base = torch.linspace(1, 0, n + 1, dtype=torch.float64)
    expected = 5 * base / (1 + 4 * base)
    assert sigmas.dtype == torch.float32 and sigmas.shape == (n + 1,)
    torch.testing.assert_close(sigmas.double(), expected, rtol=0, atol=1e-7)
    assert sigmas[0] == 1 and sigmas[-1] == 0
    torch.testing.assert_close(timesteps, sigmas[:-1] * 1000)


def test_sigma_values_for_50_steps():
    sigmas, timesteps = flow_sigmas(50)
    # σ = 0.98 → 5·0.98 / (1 + 4·0.98) = 4.9 / 4.92
    assert sigmas[1].item() == pytest.approx(4.9 / 4.92, abs=1e-7)
    assert timesteps[0].item() == 1000.0
    assert timesteps[49].item() == pytest.approx(1000 * 0.1 / 1.08, abs=1e-4)


@pytest.mark.parametrize("n", [2, 4, 25, 50])
def test_diffusers_scheduler_matches_official_table(n):
    sigmas, timesteps = flow_sigmas(n)
    scheduler = flow_match_scheduler(n)
    assert scheduler.config.shift == 5.0
    assert torch.equal(scheduler.sigmas, sigmas)
    assert torch.equal(scheduler.timesteps, timesteps)


def test_diffusers_default_spacing_differs():
    """The explicit sigmas are needed: the scheduler's own spacing is not the official one."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    default = FlowMatchEulerDiscreteScheduler(shift=5.0)
    default.set_timesteps(50)
    assert not torch.allclose(default.sigmas, flow_sigmas(50)[0])


def test_euler_step_uses_sigma_difference_in_fp32():
    sigmas, _ = flow_sigmas(50)
    x = torch.ones(2, 3, dtype=torch.float16)
    v = torch.full((2, 3), 2.0, dtype=torch.bfloat16)
    out = euler_step(x, v, sigmas, 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, 1 + 2 * (sigmas[4] - sigmas[3]).expand(2, 3))


# ----------------------------------------------------------------------------------------------- guidance


def test_guidance_scale_at_phase_edges():
    n = 50
    assert guidance_scale(0, n) == pytest.approx(7.5)
    assert guidance_scale(9, n) == pytest.approx((1 - 9 / 50) * 5.5 + 2)  # 6.51
    assert guidance_scale(9, n) == pytest.approx(6.51)
    assert guidance_scale(10, n) == pytest.approx((1 - 10 / 50) * 3.0 + 3.5)  # 5.9
    assert guidance_scale(10, n) == pytest.approx(5.9)
    assert guidance_scale(49, n) == pytest.approx(3.56)


def test_audio_phase_ignores_cfg():
    assert guidance_scale(0, 50, cfg=4.0) == pytest.approx(4.0)
    assert guidance_scale(20, 50, cfg=4.0) == guidance_scale(20, 50, cfg=7.5)


def test_text_phase_and_face_mask_scale():
    assert [uses_text_cfg(i) for i in (0, 9, 10, 49)] == [True, True, False, False]
    assert [face_mask_scale(i) for i in (0, 9, 10, 49)] == [0.6, 0.6, 1.0, 1.0]


# ----------------------------------------------------------------------------------------------- step cache


def test_cached_steps_match_official_list_for_50():
    cached = cached_steps(50)
    assert sorted(cached) == OFFICIAL_CACHED_50
    assert [i for i in range(50) if i not in cached] == OFFICIAL_FULL_50
    assert len(cached) == 20


@pytest.mark.parametrize("n", [1, 2, 3, 4, 10, 20, 25, 30, 35, 40, 100])
def test_cached_steps_general_rule(n):
    cached = cached_steps(n)
    assert all(0 < i < n for i in cached)
    assert 0 not in cached and (n - 1) not in cached
    assert 10 not in cached  # the conditioning changes at the phase boundary: always a full step
    full = [i for i in range(n) if i not in cached]
    # never more than 4 cached steps in a row: the cache is refreshed at least every 5 steps
    assert all(b - a <= 5 for a, b in zip(full, full[1:]))


def test_cached_steps_for_small_n():
    assert cached_steps(4) == frozenset({2})
    assert cached_steps(2) == frozenset()


# ----------------------------------------------------------------------------------------------- windows


@pytest.mark.parametrize(
    ("frames", "padded", "infer", "windows", "kept", "decoded"),
    [
        (100, 129, 33, 1, 33, 129),
        (129, 129, 33, 1, 33, 129),
        (200, 205, 65, 2, 52, 205),
        (300, 305, 97, 3, 77, 305),
        (400, 405, 129, 4, 102, 405),
        (1000, 1005, 257, 8, 252, 1005),
    ],
)
def test_window_plan_worked_examples(frames, padded, infer, windows, kept, decoded):
    plan = WindowPlan(frames)
    assert plan.padded_audio_frames == padded
    assert plan.infer_length == infer
    assert plan.num_windows == windows
    assert plan.kept_latents == kept
    assert plan.decoded_frames == decoded
    assert plan.output_frames == frames
    assert plan.audio_buffer_frames == 4 * infer
    assert len(plan.windows(0)) == windows


def test_short_audio_noise_is_drawn_for_65_latents():
    plan = WindowPlan(129)
    assert plan.noise_length == 65 and plan.infer_length == 33
    assert WindowPlan(200).noise_length == WindowPlan(200).infer_length == 65


def test_no_length_cap():
    plan = WindowPlan(25 * 60 * 10)  # 10 minutes
    assert plan.output_frames == 15000
    assert plan.kept_latents == (15000 + 5) // 4 + 1


def test_shift_progression():
    plan = WindowPlan(400)
    assert [plan.shift(i) for i in range(8)] == [0, 10, 20, 30, 7, 17, 27, 4]
    single = WindowPlan(129)
    assert {single.shift(i) for i in range(50)} == {0}


def test_window_index_wrap():
    plan = WindowPlan(200)  # infer_length 65, audio buffer 260
    first, second = plan.windows(1)  # shift 10: starts −10 and 23
    assert first.latent_index.tolist() == [*range(55, 65), *range(0, 23)]
    assert second.latent_index.tolist() == list(range(23, 56))
    assert first.audio_index.tolist() == [*range(220, 260), *range(0, 89)]
    assert second.audio_index.tolist() == list(range(92, 221))


@pytest.mark.parametrize("frames", [129, 200, 400, 1000])
def test_windows_match_official_index_lists(frames):
    plan = WindowPlan(frames)
    length, shift = plan.infer_length, 0
    for step in range(12):
        for k, window in enumerate(plan.windows(step)):
            start = k * 33 - shift
            assert window.latent_index.tolist() == [ii % length for ii in range(start, start + 33)]
            assert window.audio_index.tolist() == [ii % (4 * length) for ii in range(start * 4, (start + 33) * 4 - 3)]
        shift = (shift + (0 if plan.is_single_window else 10)) % 33


@pytest.mark.parametrize("frames", [200, 400, 1000])
def test_every_latent_is_visited_every_step(frames):
    plan = WindowPlan(frames)
    for step in range(5):
        counts = torch.zeros(plan.infer_length)
        for window in plan.windows(step):
            assert len(set(window.latent_index.tolist())) == 33
            counts[window.latent_index] += 1
        assert counts.min() >= 1


def test_invalid_inputs():
    with pytest.raises(ValueError):
        WindowPlan(0)
    with pytest.raises(ValueError):
        flow_sigmas(0)
