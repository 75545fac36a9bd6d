"""The flow equations against independent references (diffusers, hand-computed numbers)."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.flux.pipeline_flux import calculate_shift

from fluxsr_core import flow


class StraightLine:
    """A velocity model that knows the pair: returns the exact straight-line velocity eps - z0."""

    def __init__(self, z0, eps):
        self.z0, self.eps = z0, eps

    def __call__(self, latent, sigma, cond, position_offset=(0, 0)):
        return self.eps - self.z0


def flux_scheduler():
    return FlowMatchEulerDiscreteScheduler(
        use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096, shift=3.0)


@pytest.mark.parametrize("seq_len", [256, 1024, 4096, 16384])
def test_mu_matches_diffusers(seq_len):
    assert flow.flux_mu(seq_len) == pytest.approx(calculate_shift(seq_len), abs=1e-12)


@pytest.mark.parametrize("steps,seq_len", [(1, 256), (4, 1024), (28, 4096), (50, 64)])
def test_sigmas_match_diffusers_scheduler(steps, seq_len):
    sched = flux_scheduler()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(seq_len))
    ours = flow.flux_sigmas(steps, seq_len)
    assert ours.shape == (steps + 1,)
    torch.testing.assert_close(ours, sched.sigmas.float(), atol=1e-6, rtol=0)


def test_time_shift_matches_diffusers_helper():
    sched = flux_scheduler()
    t = torch.tensor([0.1, 0.25, 0.5, 0.9], dtype=torch.float64)
    for mu in (0.5, 0.8, 1.15):
        torch.testing.assert_close(flow.time_shift(mu, t), sched.time_shift(mu, 1.0, t))


def test_euler_sampler_matches_diffusers_step():
    """Our Euler update equals the diffusers scheduler's step with the same velocities."""
    torch.manual_seed(0)
    steps, x = 5, torch.randn(1, 16, 4, 4)
    vs = [torch.randn_like(x) for _ in range(steps)]
    calls = iter(vs)
    sigmas = flow.flux_sigmas(steps, 16)
    seen = []
    ours = flow.euler_sample(lambda z, s, c, position_offset=(0, 0): next(calls), x, sigmas, None,
                             callback=lambda i, s, sn, z, v: seen.append((i, s, sn)))
    sched = flux_scheduler()
    sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=calculate_shift(16))
    ref = x.clone()
    for i, t in enumerate(sched.timesteps):
        ref = sched.step(vs[i], t, ref).prev_sample
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    assert [s[0] for s in seen] == list(range(steps))
    assert seen[-1][2] == 0.0


def test_one_step_recovers_z0_with_exact_velocity():
    torch.manual_seed(1)
    z0, eps = torch.randn(2, 16, 6, 6), torch.randn(2, 16, 6, 6)
    t_l = 0.25
    z_l = (1 - t_l) * z0 + t_l * eps  # z_L on the straight line at T_L
    z_h = flow.one_step_sr(StraightLine(z0, eps), z_l, t_l, cond=None)
    torch.testing.assert_close(z_h, z0, atol=1e-6, rtol=0)


def test_one_step_hand_numbers():
    z_l = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    v = torch.full_like(z_l, 2.0)
    out = flow.one_step_sr(lambda z, s, c, position_offset=(0, 0): v, z_l, 0.25, None)
    assert out.flatten().tolist() == [0.5, 1.5, 2.5, 3.5]


def test_one_step_passes_sigma_t_l_per_sample():
    got = {}

    def model(z, sigma, cond, position_offset=(0, 0)):
        got["sigma"] = sigma
        return torch.zeros_like(z)

    flow.one_step_sr(model, torch.zeros(3, 16, 2, 2), 0.3, None)
    assert got["sigma"].shape == (3,)
    assert torch.allclose(got["sigma"], torch.full((3,), 0.3))


def test_ftd_quantities_hand_numbers():
    eps, z0, z_l, t_l = torch.tensor([2.0]), torch.tensor([1.0]), torch.tensor([1.25]), 0.25
    assert flow.teacher_velocity(eps, z0).item() == 1.0
    assert flow.sr_velocity(z_l, z0, t_l).item() == 1.0          # (1.25 - 1) / 0.25
    assert flow.noise_to_lr_velocity(eps, z_l, t_l).item() == 1.0  # (2 - 1.25) / 0.75
    # u = (1 - T_L) u_L + T_L u_SR: an identity of the three definitions (any z_L, on the line
    # or not), checked here as one more guard on their signs and denominators
    u = flow.teacher_velocity(eps, z0)
    u_l = flow.noise_to_lr_velocity(eps, z_l, t_l)
    u_sr = flow.sr_velocity(z_l, z0, t_l)
    assert torch.allclose(u, (1 - t_l) * u_l + t_l * u_sr)
    # z_t at t = 0.5: ((1 - .5) * 1.25 + (.5 - .25) * 2) / .75 = (0.625 + 0.5) / 0.75 = 1.5
    assert flow.ftd_interpolate(z_l, eps, 0.5, t_l).item() == pytest.approx(1.5)
    # v_phi = (u - T_L v_t) / (1 - T_L) with v_t = 3: (1 - 0.75) / 0.75 = 1/3
    assert flow.implied_noise_to_lr_velocity(u, torch.tensor([3.0]), t_l).item() == pytest.approx(1 / 3)


def test_ftd_interpolate_ends_and_straight_line():
    torch.manual_seed(2)
    z0, eps, t_l = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4), 0.25
    z_l = (1 - t_l) * z0 + t_l * eps
    torch.testing.assert_close(flow.ftd_interpolate(z_l, eps, t_l, t_l), z_l)
    torch.testing.assert_close(flow.ftd_interpolate(z_l, eps, 1.0, t_l), eps)
    # interior points lie on the teacher's line x_t = (1 - t) z0 + t eps: a sign flip breaks this
    for t in (0.4, 0.7):
        torch.testing.assert_close(flow.ftd_interpolate(z_l, eps, t, t_l), (1 - t) * z0 + t * eps,
                                   atol=1e-5, rtol=0)


def test_sign_flip_in_z_t_is_detected(monkeypatch):
    torch.manual_seed(3)
    z0, eps, t_l = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4), 0.25
    z_l = (1 - t_l) * z0 + t_l * eps
    monkeypatch.setattr(flow, "FTD_EPS_SIGN", -1.0)
    assert not torch.allclose(flow.ftd_interpolate(z_l, eps, 0.6, t_l), 0.4 * z0 + 0.6 * eps, atol=1e-3)


def test_ftd_loss_zero_for_exact_teacher_and_hand_value():
    torch.manual_seed(4)
    z0, eps, t_l = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), 0.25
    z_l = (1 - t_l) * z0 + t_l * eps
    t = torch.tensor([0.5, 0.9])
    assert flow.ftd_loss(StraightLine(z0, eps), z_l, z0, eps, t, t_l, None).item() == pytest.approx(0, abs=1e-10)
    # a model off by a constant c gives v_phi off by -T_L c / (1 - T_L): loss = (c/3)^2 for T_L = .25
    c = 0.6
    off = lambda z, s, cond, position_offset=(0, 0): eps - z0 + c
    assert flow.ftd_loss(off, z_l, z0, eps, t, t_l, None).item() == pytest.approx((c / 3) ** 2, rel=1e-5)


def test_ftd_loss_is_a_scaled_regression_on_the_sr_velocity():
    """What L_FTD reduces to, for any model and any z_L (on the line or not): with u = eps - z_0,
    v_phi - (eps - z_L)/(1 - T_L) = T_L (u_SR - v_t)/(1 - T_L), so
    L_FTD = (T_L/(1 - T_L))^2 * mean ||v_theta(z_t, t) - u_SR||^2 (1/9 at T_L 0.25): the student
    learns the LR->HR velocity at the points between z_L and the noise. The README's weighting
    advice rests on this."""
    torch.manual_seed(7)
    z0, eps, z_l = torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4), torch.randn(2, 16, 4, 4)
    t_l, t = 0.25, torch.tensor([0.4, 0.8])
    weights = torch.randn(16, 16)
    model = lambda z, s, cond, position_offset=(0, 0): torch.einsum("oc,bchw->bohw", weights, z) * s.view(-1, 1, 1, 1)
    tt = t.view(-1, 1, 1, 1)
    z_t = ((1 - tt) * z_l + (tt - t_l) * eps) / (1 - t_l)  # FLUXSR.md's z_t, written out (not ftd_interpolate)
    v_t = model(z_t, t, None)
    expected = (t_l / (1 - t_l)) ** 2 * ((v_t - (z_l - z0) / t_l) ** 2).mean()
    assert flow.ftd_loss(model, z_l, z0, eps, t, t_l, None).item() == pytest.approx(expected.item(), rel=1e-5)


def test_ftd_loss_receives_sigma_t():
    got = {}

    def model(z, sigma, cond, position_offset=(0, 0)):
        got["sigma"] = sigma.clone()
        return torch.zeros_like(z)

    z = torch.zeros(2, 16, 2, 2)
    flow.ftd_loss(model, z, z, z, torch.tensor([0.3, 0.8]), 0.25, None)
    assert torch.allclose(got["sigma"], torch.tensor([0.3, 0.8]))


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_t_l_outside_open_interval_is_refused(bad):
    with pytest.raises(ValueError, match="T_L must lie strictly between 0 and 1"):
        flow.one_step_sr(StraightLine(0, 0), torch.zeros(1, 16, 2, 2), bad, None)


def test_sample_ftd_time_range():
    g = torch.Generator().manual_seed(0)
    t = flow.sample_ftd_time(1000, 0.25, generator=g)
    assert t.min() >= 0.25 and t.max() <= 1.0
    assert abs(t.mean().item() - 0.625) < 0.02
