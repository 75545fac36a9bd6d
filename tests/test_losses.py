"""FTD, TV-LPIPS and ADL against hand-computed cases; ADL hooks on a real (tiny) FLUX model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.utils.checkpoint

from fluxsr_core.interfaces import Conditioning
from fluxsr_training.losses import (ADLAttentionHook, ADLFeatureHook, attention_diversification_loss,
                                    attention_map_diversification_loss, ftd_loss, make_adl_hook,
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


def attention_rows_by_hand(q, k):
    """softmax(q k^T / sqrt(d)) row by row, in float64, with loops: the reference."""
    b, h, s, d = q.shape
    rows = torch.zeros(b, h, s, k.shape[2], dtype=torch.float64)
    for i in range(b):
        for j in range(h):
            for n in range(s):
                logits = [float(q[i, j, n] @ k[i, j, m]) / math.sqrt(d) for m in range(k.shape[2])]
                top = max(logits)
                e = [math.exp(x - top) for x in logits]
                rows[i, j, n] = torch.tensor([x / sum(e) for x in e], dtype=torch.float64)
    return rows


def test_attention_map_adl_hand_computed():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 3, 4, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    rows = attention_rows_by_hand(q, k)
    cos = [float(rows[i, j, n] @ rows[i, j].mean(0)) /
           (float(rows[i, j, n].norm()) * float(rows[i, j].mean(0).norm()))
           for i in range(2) for j in range(3) for n in range(4)]
    assert attention_map_diversification_loss(q, k).item() == pytest.approx(sum(cos) / len(cos), rel=1e-5)
    # every query attends alike (here: all keys equal, so each row is uniform): 1
    assert attention_map_diversification_loss(q, torch.ones(2, 3, 7, 8)).item() == pytest.approx(1.0)
    # half the queries look at key 0 only, half at key 1 only: rows (1,0), (0,1), mean (.5,.5): 1/sqrt(2)
    sharp = torch.tensor([[[[40.0, 0.0], [0.0, 40.0]]]])
    assert attention_map_diversification_loss(sharp, torch.eye(2)[None, None]).item() == \
        pytest.approx(1 / math.sqrt(2), rel=1e-6)
    assert attention_map_diversification_loss(q.half(), k.half()).dtype == torch.float32
    for bad_q, bad_k in [(q[0], k), (q, k[:1]), (q, k[..., :4]), (q[:, :, :0], k)]:
        with pytest.raises(ValueError, match=r"queries \[B, H, S, d\]"):
            attention_map_diversification_loss(bad_q, bad_k)


def test_attention_form_sees_a_pattern_around_zero_mean_that_the_token_form_scores_0():
    """Tokens that alternate +v, -v (a period-2 pattern around a zero mean): the token form calls
    them perfectly diverse (0, its minimum); as queries and keys, each token attends to the tokens
    of its own phase, so the attention rows repeat with the pattern and score well above 0."""
    v = torch.tensor([3.0, 1.0, -2.0, 0.5])
    tokens = torch.stack([v if n % 2 == 0 else -v for n in range(8)])[None]   # [1, 8, 4]
    assert attention_diversification_loss(tokens).item() == 0.0
    as_heads = tokens[:, None]                                                # [1, 1, 8, 4]
    periodic = attention_map_diversification_loss(as_heads, as_heads).item()
    assert periodic == pytest.approx(1 / math.sqrt(2), abs=1e-3)   # two phases: as "sharp" above
    varied = torch.randn(1, 1, 8, 4, generator=torch.Generator().manual_seed(3)) * 3
    assert attention_map_diversification_loss(varied, varied).item() < periodic


def test_attention_map_adl_gradient_lowers_similarity():
    g = torch.Generator().manual_seed(1)
    q = (torch.randn(1, 2, 5, 4, generator=g) * 0.1).requires_grad_(True)   # near-uniform rows: ~1
    k = torch.randn(1, 2, 6, 4, generator=g)
    opt = torch.optim.SGD([q], lr=2.0)
    first = attention_map_diversification_loss(q, k).item()
    for _ in range(30):
        opt.zero_grad()
        attention_map_diversification_loss(q, k).backward()
        opt.step()
    assert attention_map_diversification_loss(q, k).item() < first - 0.1


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
            assert torch.equal(feats[0], ref["after_double"][:, -6:])  # diffusers < 0.35 passes [text; image]
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


@pytest.mark.parametrize("form", ["tokens", "attention"])
def test_hook_on_peft_model_and_gradient_checkpointing(tiny, form):
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
        with make_adl_hook(tr, form, "double:0;single:0", queries=4) as hook, \
                torch.utils.checkpoint.set_checkpoint_early_stop(False):
            hook.active = True                                 # record every forward (default)
            vel(latent, torch.tensor([0.5, 0.5]), cond)
            recorded = {lb: dict(v) if isinstance(v, dict) else v for lb, v in hook._recorded.items()}
            loss = hook.loss(sample_seeds=[1, 2])
            assert loss.requires_grad
            loss.backward()
            for lb, v in hook._recorded.items():               # not overwritten by the recomputation
                if isinstance(v, dict):
                    assert v.keys() == recorded[lb].keys() and all(v[n] is recorded[lb][n] for n in v)
                else:
                    assert v is recorded[lb]
        # (the attention form reaches no value or MLP weight of the last block it reads)
        g = {n: p.grad.clone() for n, p in tr.named_parameters() if p.requires_grad and p.grad is not None}
        assert g and any(v.abs().sum() > 0 for v in g.values())
        grads.append(g)
    assert grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        assert torch.allclose(grads[0][n], grads[1][n], atol=1e-6), n


class _OldSingleBlock(torch.nn.Module):
    """Mimics diffusers < 0.35: takes and returns the joint [text; image] tokens."""

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


class AttentionSpy:
    """Records the queries and keys torch's SDPA gets (diffusers' native path, any version)."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = torch.nn.functional.scaled_dot_product_attention

        def spy(*args, **kwargs):
            q = kwargs.get("query", args[0] if args else None)
            k = kwargs.get("key", args[1] if len(args) > 1 else None)
            self.calls.append((q.detach().clone(), k.detach().clone()))
            return real(*args, **kwargs)

        monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)


@pytest.mark.parametrize("latent_hw,text_tokens", [((4, 6), 5),    # 6 image tokens, 5 text
                                                   ((2, 4), 2)])   # 2 and 2 tokens = 2 heads: the shapes cannot tell the layout
def test_attention_hook_gives_the_queries_and_keys_the_attention_used(tiny, monkeypatch, latent_hw, text_tokens):
    tr, vel, _, _ = tiny
    g = torch.Generator().manual_seed(4)
    cond = Conditioning(t5=torch.randn(1, text_tokens, 32, generator=g), clip_pooled=torch.randn(1, 16, generator=g))
    latent = torch.randn(2, 16, *latent_hw, generator=g)
    n_img = latent_hw[0] * latent_hw[1] // 4
    spy = AttentionSpy(monkeypatch)
    with ADLAttentionHook(tr, "double:0;single:0", queries=10_000) as hook:
        with torch.no_grad():
            vel(latent, torch.tensor([0.5, 0.5]), cond)
        inputs = hook.attention_inputs()
        assert len(spy.calls) == 2 and len(inputs) == 2          # double block, then single block
        for (q, k), (seen_q, seen_k) in zip(inputs, spy.calls):
            assert q.shape == (2, 2, n_img, 16) and k.shape == (2, 2, n_img + text_tokens, 16)
            assert torch.equal(q, seen_q[:, :, -n_img:])          # image queries, text first in the model
            assert torch.equal(k, seen_k)
        # queries >= image tokens: every query, no sampling
        expected = torch.stack([attention_map_diversification_loss(q[:, :, -n_img:], k) for q, k in spy.calls]).mean()
        assert hook.loss().item() == pytest.approx(expected.item(), rel=1e-6)


def test_attention_hook_samples_queries_per_sample_seed(tiny, monkeypatch):
    tr, vel, cond, latent = tiny                                  # 6 image tokens per sample
    spy = AttentionSpy(monkeypatch)
    with ADLAttentionHook(tr, "double:0;single:0", queries=3) as hook:
        with torch.no_grad():
            vel(latent, torch.tensor([0.5, 0.5]), cond)
        seeded = hook.loss(sample_seeds=[11, 12]).item()
        assert hook.loss(sample_seeds=[11, 12]).item() == seeded
        assert hook.loss(sample_seeds=[11, 13]).item() != seeded
        # the reference: seed s picks randperm(6)[:3] of its sample's image queries, in every block
        picks = [torch.randperm(6, generator=torch.Generator().manual_seed(s))[:3] for s in (11, 12)]
        per_block = []
        for q, k in spy.calls:
            q_img = q[:, :, -6:]
            chosen = torch.stack([q_img[i][:, picks[i]] for i in range(2)])
            per_block.append(attention_map_diversification_loss(chosen, k))
        assert seeded == pytest.approx(torch.stack(per_block).mean().item(), rel=1e-6)
        # a sample's value depends on its seed only, so splitting a batch over processes agrees
        first = hook.loss(sample_seeds=[11, 12]).item()
        spy.calls.clear()
        with torch.no_grad():
            vel(latent[:1], torch.tensor([0.5]), cond)
        alone = hook.loss(sample_seeds=[11]).item()
        with torch.no_grad():
            vel(latent[1:], torch.tensor([0.5]), cond)
        assert (alone + hook.loss(sample_seeds=[12]).item()) / 2 == pytest.approx(first, rel=1e-5)
        with pytest.raises(ValueError, match="1 sample seeds for a batch of 2"):
            vel(latent, torch.tensor([0.5, 0.5]), cond)
            hook.loss(sample_seeds=[1])
        # without seeds: the hook's own generator, so the draw moves on from call to call
        draws = [hook.loss().item() for _ in range(4)]
        assert len(set(draws)) > 1, draws  # a fixed draw would give one value four times


def test_attention_hook_errors(tiny):
    tr, vel, cond, latent = tiny
    with pytest.raises(ValueError, match="at least one query"):
        ADLAttentionHook(tr, "single:0", queries=0)
    with pytest.raises(ValueError, match="unknown ADL form 'maps'; use one of tokens, attention"):
        make_adl_hook(tr, "maps")
    assert isinstance(make_adl_hook(tr, "attention", "single:0", queries=7), ADLAttentionHook)
    with ADLAttentionHook(tr, "double:0", active=False) as hook:
        with pytest.raises(RuntimeError, match="no attention inputs from blocks"):
            hook.loss()
        assert len(tr.transformer_blocks[0].attn.norm_q._forward_hooks) == 1
    assert len(tr.transformer_blocks[0].attn.norm_q._forward_hooks) == 0   # removed on exit
    with pytest.raises(ValueError, match="no attention with norm_q, norm_k.*adl_form=tokens"):
        ADLAttentionHook(_OldFlux(), "single:0")
