"""FTD, TV-LPIPS and ADL against hand-computed cases; ADL hooks on a real (tiny) FLUX model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils.checkpoint

from fluxsr_core.interfaces import Conditioning
from fluxsr_training.losses import (ADLFeatureHook, attention_diversification_loss, ftd_loss,
                                    parse_block_spec, total_variation_map, tv_lpips,
                                    tv_map_to_lpips_range)


# --- FTD ----------------------------------------------------------------------------------

class ConstVelocity:
    """A velocity model returning ``value`` everywhere and recording what it was called with."""

    def __init__(self, value: float):
        self.value = value
        self.calls = []

    def __call__(self, latent, sigma, cond, position_offset=(0, 0)):
        self.calls.append((latent.clone(), sigma.clone()))
        return torch.full_like(latent, self.value)


def test_ftd_hand_computed():
    # z0 = 0, eps = 1, T_L = 0.25, z_L = 0.25 exactly on the straight line.
    z0, eps, z_l = torch.zeros(1, 16, 2, 2), torch.ones(1, 16, 2, 2), torch.full((1, 16, 2, 2), 0.25)
    t = torch.tensor([0.5])
    # v = u = eps - z0 = 1: v_phi = (1 - 0.25) / 0.75 = 1 = (eps - z_L) / 0.75 -> loss 0
    perfect = ConstVelocity(1.0)
    assert ftd_loss(perfect, z_l, z0, eps, 0.25, None, t=t).item() == pytest.approx(0.0, abs=1e-12)
    # z_t = ((1 - 0.5) * 0.25 + (0.5 - 0.25) * 1) / 0.75 = 0.5: the point at t = 0.5 (plus sign)
    latent, sigma = perfect.calls[0]
    assert torch.allclose(latent, torch.full_like(latent, 0.5)) and sigma.tolist() == [0.5]
    # v = 0: v_phi = 1 / 0.75 = 4/3, target 1 -> (1/3)^2
    assert ftd_loss(ConstVelocity(0.0), z_l, z0, eps, 0.25, None, t=t).item() == pytest.approx(1 / 9)
    # v = 3: v_phi = (1 - 0.75) / 0.75 = 1/3 -> (2/3)^2
    assert ftd_loss(ConstVelocity(3.0), z_l, z0, eps, 0.25, None, t=0.9).item() == pytest.approx(4 / 9)


def test_ftd_draws_t_in_range_and_checks_input():
    model = ConstVelocity(0.0)
    x = torch.zeros(4, 16, 2, 2)
    g = torch.Generator().manual_seed(0)
    ftd_loss(model, x, x, x, 0.25, None, generator=g)
    sigma = model.calls[0][1]
    assert sigma.shape == (4,) and bool(((sigma >= 0.25) & (sigma <= 1)).all())
    assert len(set(sigma.tolist())) == 4
    with pytest.raises(ValueError, match=r"\[T_L, 1\]"):
        ftd_loss(model, x, x, x, 0.25, None, t=torch.full((4,), 0.1))
    with pytest.raises(ValueError, match="same shape"):
        ftd_loss(model, x, x[:1], x, 0.25, None)
    with pytest.raises(ValueError, match="T_L"):
        ftd_loss(model, x, x, x, 1.0, None)


# --- TV-LPIPS -----------------------------------------------------------------------------

def step_image():
    # one channel, 3 x 4, left half 0, right half 1
    return torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 3).view(1, 1, 3, 4)


def test_tv_map_of_step_and_ramp():
    tv = total_variation_map(step_image())
    assert tv.shape == (1, 1, 3, 4)
    assert tv[0, 0].tolist() == [[0.0, 1.0, 0.0, 0.0]] * 3      # edge between columns 1 and 2
    ramp = torch.tensor([0.0, 0.25, 0.5]).view(1, 1, 3, 1).expand(1, 2, 3, 3)
    assert total_variation_map(ramp)[0, 1, :, 0].tolist() == [0.25, 0.25, 0.0]  # |dy|, border 0
    checker = torch.tensor([[0.0, 1.0], [1.0, 0.0]]).view(1, 1, 2, 2)
    assert total_variation_map(checker)[0, 0, 0, 0].item() == 2.0  # the maximum, TV_MAX
    assert tv_map_to_lpips_range(torch.tensor([0.0, 1.0, 2.0])).tolist() == [-1.0, 0.0, 1.0]


def mean_abs_lpips(x, y):
    """A fake LPIPS: mean |x - y| per sample, [B]. Records its inputs' ranges."""
    mean_abs_lpips.seen.append((x.min().item(), x.max().item()))
    return (x - y).abs().flatten(1).mean(1)


mean_abs_lpips.seen = []


def test_tv_lpips_hand_computed():
    a = step_image().expand(1, 3, 3, 4)
    b = torch.zeros(1, 3, 3, 4)
    mean_abs_lpips.seen.clear()
    # image term: 2a - 1 vs -1 -> |diff| 2 on half the pixels -> 1.0
    # TV term: tv(a) - 1 = [-1, 0, -1, -1] vs -1 -> |diff| 1 on a quarter -> 0.25
    assert tv_lpips(a, b, mean_abs_lpips, gamma=0.0).item() == pytest.approx(1.0)
    assert tv_lpips(a, b, mean_abs_lpips, gamma=1.0).item() == pytest.approx(1.25)
    assert tv_lpips(a, b, mean_abs_lpips, gamma=2.0).item() == pytest.approx(1.5)
    assert all(-1.0 <= lo and hi <= 1.0 for lo, hi in mean_abs_lpips.seen)
    two = tv_lpips(torch.cat([a, b]), torch.cat([b, b]), mean_abs_lpips, gamma=2.0, reduction="none")
    assert two.tolist() == pytest.approx([1.5, 0.0])


def test_tv_lpips_with_lpips_shaped_output_and_gradient():
    def lpips_like(x, y):  # the lpips package returns [B, 1, 1, 1]
        return ((x - y) ** 2).mean(dim=(1, 2, 3), keepdim=True)

    a = torch.rand(2, 3, 8, 8, requires_grad=True)
    b = torch.rand(2, 3, 8, 8)
    loss = tv_lpips(a, b, lpips_like, gamma=0.5)
    assert loss.ndim == 0
    loss.backward()
    assert a.grad is not None and a.grad.abs().sum() > 0
    assert tv_lpips(b, b, lpips_like).item() == 0.0
    with pytest.raises(ValueError, match="one shape"):
        tv_lpips(a, b[:1], lpips_like)


# --- ADL ----------------------------------------------------------------------------------

def test_adl_hand_computed():
    same = torch.tensor([[[1.0, 2.0], [1.0, 2.0]]])
    assert attention_diversification_loss([same]).item() == pytest.approx(1.0)
    ortho = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])          # mean (.5, .5): cos = 1/sqrt(2)
    assert attention_diversification_loss(ortho).item() == pytest.approx(1 / math.sqrt(2))
    opposite = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]]])      # zero mean token: cosine 0 by eps
    assert attention_diversification_loss([opposite]).item() == 0.0
    with_zero = torch.tensor([[[0.0, 0.0], [1.0, 0.0]]])      # zero token: 0; other: 1 -> 0.5
    assert attention_diversification_loss([with_zero]).item() == pytest.approx(0.5)
    # averaged over blocks (blocks may differ in N and D) and over the batch
    assert attention_diversification_loss([same, ortho]).item() == pytest.approx((1 + 1 / math.sqrt(2)) / 2)
    assert attention_diversification_loss(torch.cat([same, opposite])).item() == pytest.approx(0.5)
    assert not torch.isnan(attention_diversification_loss(torch.zeros(1, 3, 4)))
    with pytest.raises(ValueError, match="at least one"):
        attention_diversification_loss([])
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        attention_diversification_loss([torch.zeros(3, 4)])


def test_adl_gradient_lowers_similarity():
    x = torch.tensor([[[1.0, 0.1], [1.0, -0.1], [0.9, 0.0]]], requires_grad=True)
    opt = torch.optim.SGD([x], lr=0.5)
    first = attention_diversification_loss(x).item()
    for _ in range(20):
        opt.zero_grad()
        attention_diversification_loss(x).backward()
        opt.step()
    assert attention_diversification_loss(x).item() < first - 0.1


def test_parse_block_spec():
    assert parse_block_spec("double:0,5;single:10", 19, 38) == [("double", 0), ("double", 5), ("single", 10)]
    assert parse_block_spec(["double:-1", "single:all"], 2, 3) == [
        ("double", 1), ("single", 0), ("single", 1), ("single", 2)]
    assert parse_block_spec("double:0 double:0,-2", 2, 1) == [("double", 0)]
    for bad, msg in [("triple:0", "expected"), ("double:", "expected"), ("double:x", "not an integer"),
                     ("single:3", "out of range.*3 single"), ("", "empty")]:
        with pytest.raises(ValueError, match=msg):
            parse_block_spec(bad, 2, 3)


# --- ADL hooks on the tiny FLUX transformer -----------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    from fluxsr_core.models import DiffusersVelocity, load_transformer

    torch.manual_seed(0)
    tr = load_transformer("tiny", dtype=torch.float32, device=None, seed=0)
    vel = DiffusersVelocity(tr, compute_dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    cond = Conditioning(t5=torch.randn(1, 5, 32, generator=g), clip_pooled=torch.randn(1, 16, generator=g))
    latent = torch.randn(2, 16, 4, 6, generator=g)        # 2 x 3 = 6 image tokens
    return tr, vel, cond, latent


def test_hook_collects_image_tokens_of_the_right_blocks(tiny):
    tr, vel, cond, latent = tiny
    ref = {}
    # independent references: what enters the first single block and the final norm
    h1 = tr.single_transformer_blocks[0].register_forward_pre_hook(
        lambda m, a, k: ref.__setitem__("after_double", k["hidden_states"]), with_kwargs=True)
    h2 = tr.norm_out.register_forward_pre_hook(lambda m, a: ref.__setitem__("after_single", a[0]))
    try:
        with ADLFeatureHook(tr, "double:0;single:-1") as hook:
            with torch.no_grad():
                vel(latent, torch.tensor([0.5, 0.5]), cond)
            feats = hook.features()
            assert hook.labels == ["double:0", "single:0"]
            assert [tuple(f.shape) for f in feats] == [(2, 6, 32), (2, 6, 32)]  # image tokens only
            assert torch.equal(feats[0], ref["after_double"])
            assert torch.equal(feats[1], ref["after_single"])
            assert hook.loss().item() == pytest.approx(attention_diversification_loss(feats).item())
        n_hooks = len(tr.transformer_blocks[0]._forward_hooks) + len(tr.single_transformer_blocks[0]._forward_hooks)
        assert n_hooks == 0 and len(tr._forward_pre_hooks) == 0   # removed on exit
    finally:
        h1.remove()
        h2.remove()


def test_hook_capture_and_missing_features(tiny):
    tr, vel, cond, latent = tiny
    with ADLFeatureHook(tr, "single:0", active=False) as hook:
        with torch.no_grad():
            vel(latent, torch.tensor([0.5, 0.5]), cond)
        with pytest.raises(RuntimeError, match="no features"):
            hook.features()
        with hook.capture(), torch.no_grad():
            vel(latent[:1], torch.tensor([0.3]), cond)
        first = hook.features()[0]
        with torch.no_grad():
            vel(latent, torch.tensor([0.5, 0.5]), cond)        # outside capture: ignored
        assert hook.features()[0] is first and first.shape[0] == 1


def test_hook_on_peft_model_and_gradient_checkpointing(tiny):
    from peft import LoraConfig

    from fluxsr_core.models import DiffusersVelocity, load_transformer

    _, _, cond, latent = tiny
    grads = []
    for checkpointing in (False, True):
        tr = load_transformer("tiny", dtype=torch.float32, device=None, seed=0)
        tr.requires_grad_(False)
        torch.manual_seed(0)                                   # same LoRA init both times
        tr.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights="gaussian",
                                  target_modules=["to_q", "to_k", "to_v", "proj_mlp"]))
        if checkpointing:
            tr.enable_gradient_checkpointing()
        tr.train()
        vel = DiffusersVelocity(tr, compute_dtype=torch.float32)
        # Without early stop the checkpoint recomputes whole blocks during backward, firing
        # the forward hooks again: the hook must ignore those calls.
        with ADLFeatureHook(tr, "double:0;single:0") as hook, \
                torch.utils.checkpoint.set_checkpoint_early_stop(False):
            hook.active = True                                 # record every forward (default)
            vel(latent, torch.tensor([0.5, 0.5]), cond)
            feats = hook.features()
            assert all(f.requires_grad for f in feats)
            hook.loss().backward()
            assert all(a is b for a, b in zip(hook.features(), feats))  # not overwritten
        g = {n: p.grad.clone() for n, p in tr.named_parameters() if p.requires_grad}
        assert g and any(v.abs().sum() > 0 for v in g.values())
        grads.append(g)
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


class _OldSingleBlock(torch.nn.Module):
    """Mimics diffusers < 0.32: takes and returns the joint [text; image] tokens."""

    def forward(self, hidden_states):
        return hidden_states * 2.0


class _OldDoubleBlock(torch.nn.Module):
    def forward(self, hidden_states, encoder_hidden_states):
        return encoder_hidden_states + 1.0, hidden_states + 1.0


class _OldFlux(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList([_OldDoubleBlock()])
        self.single_transformer_blocks = torch.nn.ModuleList([_OldSingleBlock()])

    def forward(self, hidden_states, encoder_hidden_states):
        enc, hs = self.transformer_blocks[0](hidden_states, encoder_hidden_states)
        x = self.single_transformer_blocks[0](torch.cat([enc, hs], dim=1))
        return x[:, enc.shape[1]:]


def test_hook_handles_joint_token_output_of_older_diffusers():
    model = _OldFlux()
    img, txt = torch.randn(1, 6, 4), torch.randn(1, 3, 4)
    with ADLFeatureHook(model, "double:0;single:0") as hook:
        model(img, encoder_hidden_states=txt)
        d, s = hook.features()
    assert torch.equal(d, img + 1.0)
    assert torch.equal(s, (img + 1.0) * 2.0)   # text tokens (first 3) dropped


def test_hook_needs_a_flux_model():
    with pytest.raises(ValueError, match="no FLUX transformer"):
        ADLFeatureHook(torch.nn.Linear(2, 2), "double:0")
