"""FluxSR LoRA files: load/save through diffusers+peft on the tiny FLUX transformer."""

from __future__ import annotations

import json
import os
import re
from importlib import resources

import pytest
import safetensors.torch
import torch
from diffusers import FluxTransformer2DModel
from peft import LoraConfig

from fluxsr_core import latents
from fluxsr_core.lora import (
    KEY_LORA_ALPHA,
    LORA_ADAPTER_METADATA_KEY,
    LoraError,
    adapter_rank_alpha,
    alpha_tensors_from_metadata,
    load_lora,
    lora_state_dict_from_model,
    merge_factors,
    save_lora,
    save_lora_from_model,
)
from fluxsr_core.settings import KEY_LORA_RANK, KEY_T_L, RunSettings
from fluxsr_core.weights import CorruptWeightsError, UnsafeWeightsError

RANK, ALPHA = 4, 8.0
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_mlp", "proj_out", "ff.net.2"]


def tiny_config() -> dict:
    text = resources.files("fluxsr_core.configs").joinpath("tiny-transformer.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def fresh_transformer() -> FluxTransformer2DModel:
    """The same base weights every call (seeded), so a LoRA's effect can be compared exactly."""
    torch.manual_seed(1234)
    return FluxTransformer2DModel.from_config(tiny_config()).eval()


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(7)
    h = w = 8  # latent 8x8 -> 16 tokens of 64
    latent = torch.randn(1, 16, h, w, generator=g)
    return dict(
        hidden_states=latents.pack(latent),
        encoder_hidden_states=torch.randn(1, 5, 32, generator=g),
        pooled_projections=torch.randn(1, 16, generator=g),
        timestep=torch.tensor([0.25]),
        img_ids=latents.image_ids(h, w),
        txt_ids=latents.text_ids(5),
        guidance=torch.tensor([3.5]),
        return_dict=False,
    )


def run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.fixture(scope="module")
def trained_lora():
    """A peft LoRA with random, non-zero A and B, exported in diffusers naming."""
    model = fresh_transformer()
    model.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS,
                                 init_lora_weights="gaussian"), adapter_name="student")
    g = torch.Generator().manual_seed(99)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


_TRAINED = {}


def _trained_tensors():
    return _TRAINED["sd"]


def test_alpha_is_folded_into_b_for_comfyui(lora_file):
    """ComfyUI ignores alpha metadata: the file stores B * alpha / r and alpha = r."""
    saved = safetensors.torch.load_file(str(lora_file))
    for key, value in _trained_tensors().items():
        expected = value * (ALPHA / RANK) if ".lora_B." in key else value
        torch.testing.assert_close(saved[key], expected)


@pytest.fixture(scope="module")
def lora_file(tmp_path_factory, trained_lora):
    _TRAINED["sd"] = {k: v.detach().clone() for k, v in lora_state_dict_from_model(trained_lora, "student").items()}
    path = tmp_path_factory.mktemp("lora") / "student.safetensors"
    settings = RunSettings(t_l=0.3, guidance=2.5, scale=2.0)
    save_lora(path, lora_state_dict_from_model(trained_lora, "student"), settings, RANK, ALPHA,
              extra_metadata={"fluxsr.train_step": "1200"})
    return path


def manual_merge(lora, scale: float, alpha: float, rank: int) -> FluxTransformer2DModel:
    """W + scale * (alpha / r) * B @ A on a plain copy of the base weights, computed here."""
    model = fresh_transformer()
    sd = model.state_dict()
    done = 0
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        module = key[len("transformer."):].split(".lora_A.")[0]
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        sd[module + ".weight"] = sd[module + ".weight"] + scale * (alpha / rank) * (b.float() @ a.float())
        done += 1
    assert done > 0
    model.load_state_dict(sd)
    return model


# --- the arithmetic ------------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1.0, 0.7])
def test_separate_merged_and_manual_agree(lora_file, inputs, scale):
    base = run(fresh_transformer(), inputs)

    separate = fresh_transformer()
    info = load_lora(separate, lora_file, scale=scale, merge=False)
    out_separate = run(separate, inputs)

    merged = fresh_transformer()
    info_m = load_lora(merged, lora_file, scale=scale, merge=True)
    out_merged = run(merged, inputs)

    # From the trained model's own (unfolded) weights with its alpha: the file folds alpha/r into B.
    out_manual = run(manual_merge(_trained_tensors(), scale, ALPHA, RANK), inputs)

    # The LoRA must actually change the output, or the equalities below prove nothing.
    assert (out_manual - base).abs().max() > 1e-2
    torch.testing.assert_close(out_separate, out_manual, rtol=0, atol=1e-5)
    torch.testing.assert_close(out_merged, out_manual, rtol=0, atol=1e-5)

    assert info.rank == RANK and info.alpha == RANK and not info.merged  # alpha folded into B
    assert info.adapter_name == "fluxsr" and "fluxsr" in separate.peft_config
    assert info_m.merged and info_m.adapter_name is None
    # Merged and unloaded: no peft wrappers, no adapter config left behind.
    assert not getattr(merged, "peft_config", None)
    assert not any("lora" in n for n, _ in merged.named_parameters())


def test_scale_zero_is_the_base_model(lora_file, inputs):
    base = run(fresh_transformer(), inputs)
    for merge in (False, True):
        model = fresh_transformer()
        load_lora(model, lora_file, scale=0.0, merge=merge)
        torch.testing.assert_close(run(model, inputs), base, rtol=0, atol=1e-6)


def test_diffusers_reads_our_file_the_same_way(lora_file, inputs):
    """FluxPipeline's own loader, given our file, restores the same alpha (from our metadata)."""
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    sd, alphas, md = FluxLoraLoaderMixin.lora_state_dict(
        str(lora_file), return_alphas=True, return_lora_metadata=True)
    assert md is not None and md["transformer.lora_alpha"] == RANK
    theirs = fresh_transformer()
    FluxLoraLoaderMixin.load_lora_into_transformer(sd, network_alphas=alphas, transformer=theirs,
                                                   adapter_name="x", metadata=md)
    ours = fresh_transformer()
    load_lora(ours, lora_file)
    torch.testing.assert_close(run(theirs, inputs), run(ours, inputs), rtol=0, atol=1e-6)


def test_alpha_tensors_unprefixed_keys_and_default_alpha(tmp_path, lora_file, inputs):
    lora = safetensors.torch.load_file(str(lora_file))
    plain = {k[len("transformer."):]: v for k, v in lora.items()}

    # kohya-style per-layer alpha tensors next to diffusers keys, no "transformer." prefix.
    with_alpha = dict(plain)
    for k in plain:
        if ".lora_A." in k:
            with_alpha[k.split(".lora_A.")[0] + ".alpha"] = torch.tensor(2.0)
    p1 = tmp_path / "alpha.safetensors"
    safetensors.torch.save_file(with_alpha, str(p1))
    m1 = fresh_transformer()
    info1 = load_lora(m1, p1)
    assert info1.alpha == 2.0 and "alpha tensors" in info1.alpha_source
    torch.testing.assert_close(run(m1, inputs), run(manual_merge(lora, 1.0, 2.0, RANK), inputs),
                               rtol=0, atol=1e-5)

    # No alpha anywhere: the diffusers convention alpha = rank (scale 1 per layer).
    p2 = tmp_path / "noalpha.safetensors"
    safetensors.torch.save_file(plain, str(p2))
    m2 = fresh_transformer()
    info2 = load_lora(m2, p2, scale=0.5)
    assert info2.alpha == RANK and "alpha = rank" in info2.alpha_source
    # Defaults, named as such, when the file carries no run settings.
    assert info2.settings.t_l == 0.25 and info2.settings.source["t_l"] == "default"
    assert info2.settings.lora_rank == RANK
    torch.testing.assert_close(run(m2, inputs), run(manual_merge(lora, 0.5, RANK, RANK), inputs),
                               rtol=0, atol=1e-5)


def test_layers_without_alpha_tensors_get_alpha_equal_to_rank(tmp_path, lora_file, inputs):
    """Only to_q carries an .alpha (2); every other layer then has alpha = rank (kohya's
    convention), not to_q's value, which diffusers' get_peft_kwargs would hand them."""
    lora = safetensors.torch.load_file(str(lora_file))
    plain = {k[len("transformer."):]: v for k, v in lora.items()}
    with_one = dict(plain)
    first = sorted(k for k in plain if k.endswith(".attn.to_q.lora_A.weight"))[0]
    with_one[first.split(".lora_A.")[0] + ".alpha"] = torch.tensor(2.0)
    path = _save(tmp_path, "one_alpha.safetensors", with_one)
    m = fresh_transformer()
    load_lora(m, path, merge=True)
    want = manual_merge(lora, 1.0, RANK, RANK)  # alpha = rank everywhere ...
    sd = want.state_dict()
    module = first[:-len(".lora_A.weight")]
    a, b = plain[first], plain[first.replace(".lora_A.", ".lora_B.")]
    sd[module + ".weight"] = sd[module + ".weight"] + (2.0 / RANK - 1.0) * (b.float() @ a.float())  # ... but here 2
    want.load_state_dict(sd)
    torch.testing.assert_close(run(m, inputs), run(want, inputs), rtol=0, atol=1e-5)


@pytest.mark.parametrize("prefix", ["transformer.", ""])
def test_diffusers_names_with_lora_down_up_parts(tmp_path, lora_file, inputs, prefix):
    """Some trainers write diffusers module names with kohya's part names
    (``transformer.<module>.lora_down/lora_up.weight``, ``.alpha``): down is lora_A, up is lora_B,
    and the alphas count as next to lora_A/lora_B names (diffusers' converter renamed the parts
    but left the alphas for peft, which dropped them)."""
    lora = safetensors.torch.load_file(str(lora_file))
    as_ab = {prefix + k[len("transformer."):]: v for k, v in lora.items()}
    as_ab.update({k.split(".lora_A.")[0] + ".alpha": torch.tensor(2.0) for k in list(as_ab) if ".lora_A." in k})
    as_down_up = {k.replace(".lora_A.", ".lora_down.").replace(".lora_B.", ".lora_up."): v for k, v in as_ab.items()}
    ab_path, down_up_path = _save(tmp_path, "ab.safetensors", as_ab), _save(tmp_path, "down-up.safetensors", as_down_up)

    want, got = fresh_transformer(), fresh_transformer()
    info_ab = load_lora(want, ab_path, merge=True)
    info = load_lora(got, down_up_path, merge=True)
    assert (info.rank, info.alpha, info.alpha_source) == (RANK, 2.0, "alpha tensors in the file")
    assert info.target_modules == info_ab.target_modules
    got_sd = got.state_dict()
    for key, value in want.state_dict().items():
        torch.testing.assert_close(got_sd[key], value, rtol=0, atol=0, msg=key)
    torch.testing.assert_close(run(got, inputs), run(manual_merge(lora, 1.0, 2.0, RANK), inputs), rtol=0, atol=1e-5)
    factors_ab, _ = merge_factors(fresh_transformer(), ab_path)
    factors, _ = merge_factors(fresh_transformer(), down_up_path)
    assert {k: f for k, (_, _, f) in factors.items()} == {k: f for k, (_, _, f) in factors_ab.items()}
    # kohya's DoRA magnitudes under these names are refused (diffusers dropped them: a plain merge)
    down = next(k for k in as_down_up if k.endswith(".lora_down.weight"))
    dora = {**as_down_up, down.replace(".lora_down.weight", ".dora_scale"): torch.ones(1, 32)}
    with pytest.raises(LoraError, match=r"dora.safetensors: '.*\.dora_scale' is a DoRA magnitude"):
        load_lora(fresh_transformer(), _save(tmp_path, "dora.safetensors", dora))
    # integer alphas (diffusers refused them here; kohya's path always took them) are the same alphas
    int_alphas = {k: (torch.tensor(2) if k.endswith(".alpha") else v) for k, v in as_down_up.items()}
    again = fresh_transformer()
    assert load_lora(again, _save(tmp_path, "int-alpha.safetensors", int_alphas), merge=True).alpha == 2.0
    for key, value in again.state_dict().items():
        torch.testing.assert_close(value, got_sd[key], rtol=0, atol=0, msg=key)

    one = next(k for k in as_ab if k.endswith(".attn.to_q.lora_A.weight"))
    twice = {**as_down_up, one: as_ab[one].clone()}
    module = one[len(prefix):-len(".lora_A.weight")]
    with pytest.raises(LoraError, match=rf"twice.safetensors: layer '{re.escape(module)}' has both a lora_A and a "
                                        r"lora_down weight"):
        load_lora(fresh_transformer(), _save(tmp_path, "twice.safetensors", twice))


def test_per_layer_alphas_are_reported_as_the_file_gives_them(tmp_path, lora_file):
    """An alpha tensor of 0.7 on every layer reports alpha 0.7 and no layer apart (a rank factor
    applied to every layer made 0.7 * r / r = 0.6999999999999998 differ from it)."""
    lora = safetensors.torch.load_file(str(lora_file))
    rank3 = {k: (v[:3] if ".lora_A." in k else v[:, :3]).contiguous() for k, v in lora.items()}  # x * 3 / 3 != x
    with_alpha = {**rank3, **{k.split(".lora_A.")[0] + ".alpha": torch.tensor(0.7) for k in lora if ".lora_A." in k}}
    info = load_lora(fresh_transformer(), _save(tmp_path, "a07.safetensors", with_alpha), merge=True)
    assert info.rank == 3 and info.alpha == pytest.approx(0.7) and info.alphas == {}


@pytest.mark.parametrize("metadata", [{KEY_LORA_ALPHA: "nan"}, {KEY_LORA_ALPHA: "inf"},
                                      {LORA_ADAPTER_METADATA_KEY: json.dumps({"transformer.lora_alpha": "abc"})}])
def test_an_alpha_that_is_no_finite_number_is_refused(tmp_path, lora_file, metadata):
    lora = safetensors.torch.load_file(str(lora_file))
    path = _save(tmp_path, "bad_alpha.safetensors", lora, metadata={"format": "pt", **metadata})
    m = fresh_transformer()
    with pytest.raises(LoraError, match="bad_alpha.safetensors.*(not a finite number|not a number)"):
        load_lora(m, path, merge=True)
    assert not getattr(m, "peft_config", None)


def test_xlabs_naming_goes_through_diffusers_converter(tmp_path):
    """XLabs' names start like BFL's (double_blocks.N.processor.qkv_lora1): diffusers' XLabs
    converter takes them; q|k|v of each stream get their rows of up @ down."""
    base = fresh_transformer()
    width = base.transformer_blocks[0].attn.to_q.in_features
    g = torch.Generator().manual_seed(5)
    sd = {}
    for stream in ("1", "2"):
        sd[f"double_blocks.0.processor.qkv_lora{stream}.down.weight"] = torch.randn(2, width, generator=g)
        sd[f"double_blocks.0.processor.qkv_lora{stream}.up.weight"] = torch.randn(3 * width, 2, generator=g) * 0.1
        sd[f"double_blocks.0.processor.proj_lora{stream}.down.weight"] = torch.randn(2, width, generator=g)
        sd[f"double_blocks.0.processor.proj_lora{stream}.up.weight"] = torch.randn(width, 2, generator=g) * 0.1
    path = _save(tmp_path, "xlabs.safetensors", sd)
    m = fresh_transformer()
    info = load_lora(m, path, merge=True)
    assert info.rank == 2 and len(info.target_modules) == 8
    up, down = sd["double_blocks.0.processor.qkv_lora1.up.weight"], sd["double_blocks.0.processor.qkv_lora1.down.weight"]
    for i, name in enumerate(("to_q", "to_k", "to_v")):
        delta = getattr(m.transformer_blocks[0].attn, name).weight - getattr(base.transformer_blocks[0].attn, name).weight
        torch.testing.assert_close(delta, up[i * width:(i + 1) * width] @ down, rtol=0, atol=1e-6)


def test_kohya_naming_goes_through_diffusers_converter(tmp_path, inputs):
    """sd-scripts names (lora_down/lora_up/alpha) are converted by diffusers, alpha folded in."""
    g = torch.Generator().manual_seed(3)
    r = 2
    kohya = {}
    # layers whose kohya->diffusers mapping is one-to-one (no fused qkv split)
    for name, (out_f, in_f) in {"lora_unet_double_blocks_0_img_attn_proj": (32, 32),
                                "lora_unet_single_blocks_0_linear2": (32, 160)}.items():
        kohya[f"{name}.lora_down.weight"] = torch.randn(r, in_f, generator=g) * 0.3
        kohya[f"{name}.lora_up.weight"] = torch.randn(out_f, r, generator=g) * 0.3
        kohya[f"{name}.alpha"] = torch.tensor(1.0)
    path = _save(tmp_path, "kohya.safetensors", kohya)

    model = fresh_transformer()
    info = load_lora(model, path)
    assert sorted(info.target_modules) == ["single_transformer_blocks.0.proj_out",
                                           "transformer_blocks.0.attn.to_out.0"]
    expected = fresh_transformer()
    sd = expected.state_dict()
    for name, module in (("lora_unet_double_blocks_0_img_attn_proj", "transformer_blocks.0.attn.to_out.0"),
                         ("lora_unet_single_blocks_0_linear2", "single_transformer_blocks.0.proj_out")):
        up, down = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"]
        sd[module + ".weight"] = sd[module + ".weight"] + (1.0 / r) * up @ down
    expected.load_state_dict(sd)
    torch.testing.assert_close(run(model, inputs), run(expected, inputs), rtol=0, atol=1e-5)


# kohya/sd-scripts names of FLUX's layers outside the blocks -> the diffusers module, and whether
# its output rows are BFL's (shift, scale) halves that diffusers stores as (scale, shift).
KOHYA_OUTSIDE_BLOCKS = {
    "lora_unet_img_in": ("x_embedder", False),
    "lora_unet_txt_in": ("context_embedder", False),
    "lora_unet_final_layer_linear": ("proj_out", False),
    "lora_unet_final_layer_adaLN_modulation_1": ("norm_out.linear", True),
    "lora_unet_time_in_in_layer": ("time_text_embed.timestep_embedder.linear_1", False),
    "lora_unet_time_in_out_layer": ("time_text_embed.timestep_embedder.linear_2", False),
    "lora_unet_vector_in_in_layer": ("time_text_embed.text_embedder.linear_1", False),
    "lora_unet_vector_in_out_layer": ("time_text_embed.text_embedder.linear_2", False),
    "lora_unet_guidance_in_in_layer": ("time_text_embed.guidance_embedder.linear_1", False),
    "lora_unet_guidance_in_out_layer": ("time_text_embed.guidance_embedder.linear_2", False),
}


def _kohya_lora(layers: dict[str, str], r: int = 2):
    """Random kohya tensors for ``{kohya name: diffusers module}`` on the tiny model; alphas differ
    per layer (1.0, 1.5, ...) and the second layer has none (alpha = rank)."""
    g = torch.Generator().manual_seed(21)
    base = fresh_transformer().state_dict()
    sd, alphas = {}, {}
    for i, (name, module) in enumerate(layers.items()):
        out_f, in_f = base[f"{module}.weight"].shape
        sd[f"{name}.lora_down.weight"] = torch.randn(r, in_f, generator=g) * 0.3
        sd[f"{name}.lora_up.weight"] = torch.randn(out_f, r, generator=g) * 0.3
        alphas[name] = float(r) if i == 1 else 1.0 + 0.5 * i
        if i != 1:
            sd[f"{name}.alpha"] = torch.tensor(alphas[name])
    return sd, alphas


def test_kohya_layers_outside_the_blocks_load_with_their_alphas(tmp_path, inputs):
    """sd-scripts LoRAs that also train img_in/txt_in/final_layer/time_in/vector_in/guidance_in:
    every layer merges to W + alpha/r * B @ A with its own alpha; the final modulation's B has its
    halves swapped (BFL's shift|scale is diffusers' scale|shift). diffusers 0.42's converter
    leaves these layers without the "transformer." prefix (refused before) and drops the final
    layers' alphas."""
    r = 2
    blocks = {"lora_unet_double_blocks_0_img_attn_proj": "transformer_blocks.0.attn.to_out.0",
              "lora_unet_single_blocks_0_linear2": "single_transformer_blocks.0.proj_out"}
    layers = {**blocks, **{k: m for k, (m, _) in KOHYA_OUTSIDE_BLOCKS.items()}}
    kohya, alphas = _kohya_lora(layers, r)
    assert alphas["lora_unet_single_blocks_0_linear2"] == r  # the layer without an .alpha
    path = _save(tmp_path, "kohya-full.safetensors", kohya)

    base_sd = fresh_transformer().state_dict()
    want = dict(base_sd)
    for name, module in layers.items():
        up, down = kohya[f"{name}.lora_up.weight"], kohya[f"{name}.lora_down.weight"]
        if KOHYA_OUTSIDE_BLOCKS.get(name, (None, False))[1]:
            half = up.shape[0] // 2
            up = torch.cat([up[half:], up[:half]])
        want[f"{module}.weight"] = base_sd[f"{module}.weight"] + (alphas[name] / r) * up @ down

    model = fresh_transformer()
    info = load_lora(model, path, merge=True)
    assert sorted(info.target_modules) == sorted(layers.values())
    assert any("converted 10 LoRA layers outside the blocks from kohya/sd-scripts naming into 10 diffusers layers" in n
               for n in info.notes)
    got = model.state_dict()
    assert set(got) == set(want)
    for key in want:  # the LoRA's layers as computed by hand, every other weight untouched
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    # the swap is visible: the unswapped B would give other adaLN weights
    up = kohya["lora_unet_final_layer_adaLN_modulation_1.lora_up.weight"]
    down = kohya["lora_unet_final_layer_adaLN_modulation_1.lora_down.weight"]
    unswapped = base_sd["norm_out.linear.weight"] + (alphas["lora_unet_final_layer_adaLN_modulation_1"] / r) * up @ down
    assert (got["norm_out.linear.weight"] - unswapped).abs().max() > 1e-2

    # the fp8 modes' merge-while-loading gets the same per-layer alphas (diffusers folds the
    # blocks' alphas into their tensors, so only the layers outside the blocks carry a factor)
    factors, _ = merge_factors(fresh_transformer(), path)
    assert {f"{m}.weight": factors[f"{m}.weight"][2] for m, _ in KOHYA_OUTSIDE_BLOCKS.values()} == \
        {f"{m}.weight": alphas[n] / r for n, (m, _) in KOHYA_OUTSIDE_BLOCKS.items()}

    out, base = run(model, inputs), run(fresh_transformer(), inputs)
    assert (out - base).abs().max() > 1e-2
    unmerged = fresh_transformer()
    load_lora(unmerged, path, merge=False)  # as a peft adapter: the same model
    torch.testing.assert_close(run(unmerged, inputs), out, rtol=1e-5, atol=1e-5)


def test_kohya_outside_block_errors_are_named(tmp_path):
    kohya, _ = _kohya_lora({"lora_unet_img_in": "x_embedder",
                            "lora_unet_guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1"})
    half = {k: v for k, v in kohya.items() if k != "lora_unet_img_in.lora_up.weight"}
    with pytest.raises(LoraError, match="layer 'lora_unet_img_in' has lora_A but not lora_B"):
        load_lora(fresh_transformer(), _save(tmp_path, "half.safetensors", half))
    for odd in ("lora_unet_img_in.dora_scale", "lora_unet_img_in.processor.weight"):
        with pytest.raises(LoraError, match=f"'{odd}' is no lora_.*kohya/sd-scripts naming"):
            load_lora(fresh_transformer(), _save(tmp_path, "odd.safetensors", {**kohya, odd: torch.zeros(1, 64)}))
    # in the blocks too, where diffusers' converter would drop them with a log line only
    blocks, _ = _kohya_lora({"lora_unet_double_blocks_0_img_attn_proj": "transformer_blocks.0.attn.to_out.0"})
    odd = "lora_unet_double_blocks_0_img_attn_proj.dora_scale"
    with pytest.raises(LoraError, match=f"'{odd}' is no lora_.*DoRA.*kohya/sd-scripts naming"):
        load_lora(fresh_transformer(), _save(tmp_path, "odd.safetensors", {**blocks, odd: torch.zeros(1, 32)}))
    no_guidance = FluxTransformer2DModel.from_config({**tiny_config(), "guidance_embeds": False})
    with pytest.raises(LoraError, match="'lora_unet_guidance_in_in_layer' is no layer of this FLUX transformer "
                                        r"\(kohya/sd-scripts naming\)"):
        load_lora(no_guidance, _save(tmp_path, "guidance.safetensors", kohya))


@pytest.mark.parametrize("key,kind", [
    ("transformer.transformer_blocks.0.attn.to_q.hada_w1_a", "LyCORIS LoHa"),
    ("lycoris_transformer_blocks_0_attn_to_q.lokr_w1", "LyCORIS LoKr"),
    ("transformer.transformer_blocks.0.attn.to_q.lokr_w2_b", "LyCORIS LoKr"),
    ("lora_unet_double_blocks_0_img_attn_proj.oft_blocks", "LyCORIS OFT"),
    ("diffusion_model.double_blocks.0.img_attn.norm.query_norm.diff", "ComfyUI's full differences"),
    ("diffusion_model.double_blocks.0.img_attn.proj.diff_b", "ComfyUI's full differences"),
    ("lora_unet_double_blocks_0_img_attn_proj.diff_b", "ComfyUI's full differences")])
def test_other_adapter_kinds_are_named_as_such(tmp_path, key, kind):
    """LyCORIS files and ComfyUI's full differences (its Train LoRA node writes .diff_b for every
    biased layer) were called a full model, an unknown naming or a DoRA; said as what they are,
    alone or beside LoRA layers, with where they do load (ComfyUI's loaders)."""
    lora_layers = {f"transformer.transformer_blocks.0.attn.to_k.lora_{p}.weight": torch.zeros(4, 4) for p in "AB"}
    for tensors in ({key: torch.zeros(4, 4)}, {**lora_layers, key: torch.zeros(4, 4)}):
        with pytest.raises(LoraError, match=f"^odd.safetensors (is a|holds) {kind} .*'{re.escape(key)}'.*In ComfyUI, "
                                            "FluxSR Load LoRA .*applies such a file"):
            load_lora(fresh_transformer(), _save(tmp_path, "odd.safetensors", tensors))


# Layers of a full BFL-named LoRA on the tiny model: fused q|k|v (both streams), the single
# blocks' fused q|k|v|mlp, the final modulation (halves swapped against diffusers), embedders.
BFL_TARGETS = ["double_blocks.0.img_attn.qkv", "double_blocks.0.txt_attn.qkv", "double_blocks.0.img_attn.proj",
               "double_blocks.0.img_mlp.0", "double_blocks.0.txt_mlp.2", "double_blocks.0.img_mod.lin",
               "single_blocks.0.linear1", "single_blocks.0.linear2", "single_blocks.0.modulation.lin",
               "final_layer.linear", "final_layer.adaLN_modulation.1", "img_in", "txt_in", "time_in.in_layer"]


def _bfl_lora(r: int = 2, alpha=None, names=("lora_A", "lora_B"), prefix: str = "diffusion_model."):
    """A random LoRA on BFL_TARGETS in BFL names, and the tiny model's BFL weights with its delta
    added by hand (W + alpha/r * B @ A), the reference no LoRA code touches."""
    from fluxsr_core.weights import transformer_state_dict_to_bfl

    g = torch.Generator().manual_seed(11)
    base = transformer_state_dict_to_bfl({k: v.clone() for k, v in fresh_transformer().state_dict().items()})
    lora, merged = {}, dict(base)
    for t in BFL_TARGETS:
        w = base[f"{t}.weight"]
        a, b = torch.randn(r, w.shape[1], generator=g) * 0.1, torch.randn(w.shape[0], r, generator=g) * 0.1
        lora[f"{prefix}{t}.{names[0]}.weight"], lora[f"{prefix}{t}.{names[1]}.weight"] = a, b
        if alpha is not None:
            lora[f"{prefix}{t}.alpha"] = torch.tensor(float(alpha))
        merged[f"{t}.weight"] = w + ((alpha if alpha is not None else r) / r) * b @ a
    return lora, merged


@pytest.mark.parametrize("names,prefix,alpha", [(("lora_A", "lora_B"), "diffusion_model.", None),
                                                (("lora_down", "lora_up"), "diffusion_model.", 1.0),
                                                (("lora_A", "lora_B"), "", 4.0)])
def test_bfl_naming_is_split_exactly(tmp_path, inputs, names, prefix, alpha):
    """A LoRA in BFL/ComfyUI module names (fused q|k|v etc.) merges to exactly the model whose
    BFL weights got the delta by hand (converted by the weight loader, which no LoRA code uses)."""
    from fluxsr_core import models

    lora, merged = _bfl_lora(alpha=alpha, names=names, prefix=prefix)
    path = _save(tmp_path, "bfl-lora.safetensors", {**lora, "lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha":
                                                    torch.tensor(1.0)})
    safetensors.torch.save_file(merged, tmp_path / "flux-merged.safetensors")
    expected = models.load_transformer(tmp_path / "flux-merged.safetensors", dtype="fp32")
    model = fresh_transformer()
    info = load_lora(model, path, merge=True)
    assert any("converted 14 LoRA layers from BFL/ComfyUI naming into 21 diffusers" in n for n in info.notes)
    assert any("ignored 1 text-encoder" in n for n in info.notes)
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.add_v_proj", "norm_out.linear",
            "single_transformer_blocks.0.proj_mlp", "x_embedder"} <= set(info.target_modules)
    torch.testing.assert_close(run(model, inputs), run(expected, inputs), rtol=0, atol=1e-5)
    unmerged = fresh_transformer()
    load_lora(unmerged, path, merge=False)  # as a peft adapter: the same model
    torch.testing.assert_close(run(unmerged, inputs), run(expected, inputs), rtol=0, atol=1e-5)


def test_bfl_naming_streams_into_fp8(tmp_path, tiny_model_files):
    """The fp8 load merges each weight as it arrives (lora.merge_factors): a BFL-named LoRA meets
    every weight there too (fp32 compute: the merged model, then cast)."""
    from fluxsr_core import models

    lora, _ = _bfl_lora()
    path = _save(tmp_path, "bfl-lora.safetensors", lora)
    got, info = models.load_transformer_fp8(tiny_model_files.transformer, "fp8_storage_all", dtype="fp32",
                                            device="cpu", lora=path)
    ref = models.load_transformer(tiny_model_files.transformer, dtype="fp32")
    load_lora(ref, path, merge=True)
    models.store_in_fp8(ref, torch.float32, every_linear=True)
    same = total = 0
    for (name, p), q in zip(ref.named_parameters(), got.parameters()):
        if p.dtype == torch.float8_e4m3fn:
            total += p.numel()
            same += int((p.view(torch.uint8) == q.view(torch.uint8)).sum())
    assert info.merged and total and same / total > 0.999


def test_bfl_naming_errors_are_named(tmp_path):
    lora, _ = _bfl_lora()
    cases = {
        "mixed": ({**lora, "transformer.transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(2, 32)},
                  r"mixes namings: 1 tensors in diffusers/peft naming .* and 28 in BFL/ComfyUI naming .*both change "
                  r"the layer 'transformer_blocks\.0\.attn\.to_q'"),
        "dora": ({**lora, "diffusion_model.img_in.dora_scale": torch.zeros(1, 32)}, "no lora_A/lora_B"),
        "half": ({k: v for k, v in lora.items() if k != "diffusion_model.img_in.lora_B.weight"},
                 "layer 'img_in' has lora_A but not lora_B"),
        "deeper": ({**lora, "diffusion_model.double_blocks.3.img_attn.proj.lora_A.weight": torch.zeros(2, 32),
                    "diffusion_model.double_blocks.3.img_attn.proj.lora_B.weight": torch.zeros(32, 2)},
                   "'double_blocks.3.img_attn.proj' is no layer of this FLUX transformer"),
    }
    for name, (sd, message) in cases.items():
        with pytest.raises(LoraError, match=message):
            load_lora(fresh_transformer(), _save(tmp_path, f"{name}.safetensors", sd))


def test_kohya_report_gives_the_files_alphas(tmp_path, inputs):
    """diffusers folds kohya's block alphas into A/B (peft then applies alpha = rank there):
    LoraInfo reports the file's own .alpha values, and the merge is still W + alpha/r * B @ A."""
    r = 2
    layers = {"lora_unet_double_blocks_0_img_attn_qkv": ["transformer_blocks.0.attn.to_q",
                                                         "transformer_blocks.0.attn.to_k",
                                                         "transformer_blocks.0.attn.to_v"],
              "lora_unet_double_blocks_0_txt_attn_proj": ["transformer_blocks.0.attn.to_add_out"],  # no .alpha
              "lora_unet_double_blocks_0_img_attn_proj": ["transformer_blocks.0.attn.to_out.0"],
              "lora_unet_img_in": ["x_embedder"]}
    file_alpha = {"lora_unet_double_blocks_0_img_attn_qkv": 1.0, "lora_unet_double_blocks_0_txt_attn_proj": None,
                  "lora_unet_double_blocks_0_img_attn_proj": 1.0, "lora_unet_img_in": 3.0}
    base_sd = fresh_transformer().state_dict()
    g = torch.Generator().manual_seed(31)
    kohya, want = {}, dict(base_sd)
    for name, modules in layers.items():
        in_f = base_sd[f"{modules[0]}.weight"].shape[1]
        out_f = sum(base_sd[f"{m}.weight"].shape[0] for m in modules)
        down, up = torch.randn(r, in_f, generator=g) * 0.3, torch.randn(out_f, r, generator=g) * 0.3
        kohya[f"{name}.lora_down.weight"], kohya[f"{name}.lora_up.weight"] = down, up
        if file_alpha[name] is not None:
            kohya[f"{name}.alpha"] = torch.tensor(file_alpha[name])
        delta = ((file_alpha[name] or r) / r) * up @ down
        for i, m in enumerate(modules):  # q|k|v: each its rows of up @ down
            want[f"{m}.weight"] = base_sd[f"{m}.weight"] + delta[i * 32:(i + 1) * 32]
    path = _save(tmp_path, "kohya-alphas.safetensors", kohya)

    model = fresh_transformer()
    info = load_lora(model, path, merge=True)
    assert info.rank == r and info.alpha == 1.0
    assert info.alphas == {"transformer_blocks.0.attn.to_add_out": 2.0, "x_embedder": 3.0}
    assert info.alpha_source == ("'.alpha' tensors (those of 4 layers folded into the weights by diffusers' "
                                 "kohya converter)")
    assert "rank 2, alpha 1 ('.alpha' tensors (those of 4 layers folded" in info.describe()
    got = model.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    # what the merge applies differs from what is reported: 1 on the folded layers, x_embedder 3/2
    factors, info_f = merge_factors(fresh_transformer(), path)
    assert {k: f for k, (_, _, f) in factors.items()} == {
        **{f"{m}.weight": 1.0 for n, ms in layers.items() if n != "lora_unet_img_in" for m in ms},
        "x_embedder.weight": 1.5}
    assert (info_f.alpha, info_f.alphas) == (info.alpha, info.alphas)

    # only block layers: every alpha was folded
    blocks = {k: v for k, v in kohya.items() if not k.startswith("lora_unet_img_in")}
    info2 = load_lora(fresh_transformer(), _save(tmp_path, "blocks.safetensors", blocks))
    assert info2.alpha_source == "'.alpha' tensors (folded into the weights by diffusers' kohya converter)"
    assert (info2.alpha, info2.alphas) == (1.0, {"transformer_blocks.0.attn.to_add_out": 2.0})

    # a damaged block alpha is refused, not folded into NaN weights
    nan = {**blocks, "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(float("nan"))}
    with pytest.raises(LoraError, match="alpha nan of 'lora_unet_double_blocks_0_img_attn_proj' is not a finite"):
        load_lora(fresh_transformer(), _save(tmp_path, "nan.safetensors", nan))


def _fused_kohya_pair(g, in_f: int, split_rows: list[int], rank: int, form: str):
    """lora_down [rank, in_f], lora_up [sum(split_rows), rank] of one kohya layer over a fused
    weight (q|k|v, or a single block's q|k|v|mlp). "dense": one lora_down over the fused layer;
    "block-sparse": sd-scripts' split_qkv, each part its own rank // parts rows of lora_down and
    its own block of lora_up, zero elsewhere; "untrained": dense with lora_up still zero, as
    sd-scripts initialises it (diffusers' converter takes that for block-sparse too)."""
    down = torch.randn(rank, in_f, generator=g) * 0.3
    up = torch.randn(sum(split_rows), rank, generator=g) * 0.3
    if form == "block-sparse":
        up = up * torch.block_diag(*[torch.ones(rows, rank // len(split_rows)) for rows in split_rows])
    elif form == "untrained":
        up = torch.zeros_like(up)
    return down, up


@pytest.mark.parametrize("alpha", [3.0, None])
@pytest.mark.parametrize("form", ["dense", "block-sparse", "untrained"])
def test_kohya_fused_qkv_reports_the_files_rank(tmp_path, form, alpha):
    """diffusers' converter splits a kohya fused q|k|v into to_q/to_k/to_v, a block-sparse one into
    parts of a third of its rank. The merge is W + alpha/r * (up @ down)[the part's rows] with r the
    file's lora_down rows (as ComfyUI and diffusers read it), and LoraInfo reports that r: the rank
    the alpha is divided by, not the parts' rank."""
    r, layer = 6, "lora_unet_double_blocks_0_img_attn_qkv"
    down, up = _fused_kohya_pair(torch.Generator().manual_seed(59), 32, [32] * 3, r, form)
    kohya = {f"{layer}.lora_down.weight": down, f"{layer}.lora_up.weight": up}
    if alpha is not None:
        kohya[f"{layer}.alpha"] = torch.tensor(alpha)
    path = _save(tmp_path, "kohya-qkv.safetensors", kohya)
    base = fresh_transformer().state_dict()
    delta = ((alpha or r) / r) * up @ down
    modules = [f"transformer_blocks.0.attn.{name}" for name in ("to_q", "to_k", "to_v")]

    model = fresh_transformer()
    info = load_lora(model, path, merge=True)
    got = model.state_dict()
    factors, info_f = merge_factors(fresh_transformer(), path)
    for i, module in enumerate(modules):
        rows = delta[i * 32:(i + 1) * 32]
        torch.testing.assert_close(got[f"{module}.weight"], base[f"{module}.weight"] + rows, rtol=0, atol=1e-6)
        a, b, factor = factors[f"{module}.weight"]
        torch.testing.assert_close(factor * b @ a, rows, rtol=0, atol=1e-6)
    for report in (info, info_f):
        assert (report.rank, report.ranks, report.alpha, report.alphas) == (r, {}, alpha or r, {})
        assert report.settings.lora_rank == r
    assert f"rank {r}, alpha {alpha or r:g}" in info.describe()


@pytest.mark.parametrize("form", ["dense", "block-sparse"])
def test_kohya_single_block_linear1_reports_the_files_rank(tmp_path, form):
    """A single block's fused q|k|v|mlp (kohya's linear1; sd-scripts' split_qkv makes it 4 blocks).
    diffusers' converter splits it by FLUX.1's widths only, so this runs merge_factors on a
    FLUX.1-wide single block on the meta device; the parts' deltas are checked on random inputs."""
    cfg = {**tiny_config(), "num_attention_heads": 24, "attention_head_dim": 128, "axes_dims_rope": [16, 56, 56],
           "num_layers": 0}
    with torch.device("meta"):
        wide = FluxTransformer2DModel.from_config(cfg)
    r, alpha, layer, widths = 8, 2.0, "lora_unet_single_blocks_0_linear1", [3072, 3072, 3072, 12288]
    g = torch.Generator().manual_seed(61)
    down, up = _fused_kohya_pair(g, 3072, widths, r, form)
    path = _save(tmp_path, "kohya-linear1.safetensors", {f"{layer}.lora_down.weight": down,
                                                         f"{layer}.lora_up.weight": up,
                                                         f"{layer}.alpha": torch.tensor(alpha)})
    factors, info = merge_factors(wide, path)
    probe = torch.randn(3072, 4, generator=g)
    start = 0
    for module, rows in zip(("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), widths):
        a, b, factor = factors[f"single_transformer_blocks.0.{module}.weight"]
        want = (alpha / r) * up[start:start + rows] @ (down @ probe)
        torch.testing.assert_close(factor * b @ (a @ probe), want, rtol=1e-5, atol=1e-6, msg=module)
        start += rows
    assert (info.rank, info.ranks, info.alpha, info.alphas) == (r, {}, alpha, {})


# --- files mixing namings ------------------------------------------------------------------

def _pair(g, out_f: int, in_f: int, r: int = 2):
    return torch.randn(r, in_f, generator=g) * 0.3, torch.randn(out_f, r, generator=g) * 0.3


def test_diffusers_and_kohya_keys_in_one_file_both_load(tmp_path, inputs):
    """diffusers' converter, given transformer.* next to lora_unet_* keys, keeps the transformer.*
    ones and drops the kohya layers unannounced; each naming is converted on its own instead."""
    g = torch.Generator().manual_seed(41)
    a_q, b_q = _pair(g, 32, 32)
    a_o, b_o = _pair(g, 32, 32)
    a_x, b_x = _pair(g, 32, 64)
    sd = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a_q,
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b_q,
          "lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": a_o,
          "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": b_o,
          "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(1.0),
          "lora_unet_img_in.lora_down.weight": a_x, "lora_unet_img_in.lora_up.weight": b_x}
    path = _save(tmp_path, "mixed.safetensors", sd)
    model = fresh_transformer()
    info = load_lora(model, path, merge=True)
    assert info.target_modules == ["transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.attn.to_q",
                                   "x_embedder"]
    assert any("mixes namings (2 tensors in diffusers/peft naming and 5 in kohya/sd-scripts naming)" in n
               for n in info.notes)
    base, got = fresh_transformer().state_dict(), model.state_dict()
    want = {**base, "transformer_blocks.0.attn.to_q.weight": base["transformer_blocks.0.attn.to_q.weight"] + b_q @ a_q,
            "transformer_blocks.0.attn.to_out.0.weight":
                base["transformer_blocks.0.attn.to_out.0.weight"] + 0.5 * b_o @ a_o,
            "x_embedder.weight": base["x_embedder.weight"] + b_x @ a_x}
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def test_every_naming_in_one_file(tmp_path, inputs):
    """diffusers (prefixed and not), BFL, kohya blocks and outer layers, kohya-style diffusers
    names and XLabs in one file, on different layers: each layer merges as by hand, its own alpha
    (kohya's folded by diffusers, reported as the file's), as adapter and in merge_factors too."""
    g = torch.Generator().manual_seed(43)
    base = fresh_transformer().state_dict()
    # (file keys' stem, naming of A/B, alpha or None, diffusers module); XLabs uses no alpha
    layers = [("transformer.transformer_blocks.0.attn.to_q", ("lora_A", "lora_B"), 3.0,
               "transformer_blocks.0.attn.to_q"),
              ("single_transformer_blocks.0.attn.to_v", ("lora_A", "lora_B"), None, "single_transformer_blocks.0.attn.to_v"),
              ("diffusion_model.double_blocks.0.txt_mlp.0", ("lora_A", "lora_B"), 1.0,
               "transformer_blocks.0.ff_context.net.0.proj"),
              ("lora_unet_double_blocks_0_img_attn_proj", ("lora_down", "lora_up"), 1.0,
               "transformer_blocks.0.attn.to_out.0"),
              ("lora_unet_img_in", ("lora_down", "lora_up"), 3.0, "x_embedder"),
              ("lora_transformer_single_transformer_blocks_0_attn_to_k", ("lora_down", "lora_up"), 1.0,
               "single_transformer_blocks.0.attn.to_k"),
              ("single_blocks.0.processor.proj_lora", ("down", "up"), None, "single_transformer_blocks.0.proj_out")]
    r = 2
    sd, want, deltas = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha": torch.tensor(1.0)}, dict(base), {}
    for stem, (a_name, b_name), alpha, module in layers:
        out_f, in_f = base[f"{module}.weight"].shape
        a, b = _pair(g, out_f, in_f, r)
        sd[f"{stem}.{a_name}.weight"], sd[f"{stem}.{b_name}.weight"] = a, b
        if alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(alpha)
        deltas[f"{module}.weight"] = ((alpha or r) / r) * b @ a
        want[f"{module}.weight"] = base[f"{module}.weight"] + deltas[f"{module}.weight"]
    path = _save(tmp_path, "all-namings.safetensors", sd)

    model = fresh_transformer()
    info = load_lora(model, path, merge=True)
    assert info.target_modules == sorted(m for *_, m in layers)
    assert any("mixes namings (3 tensors in diffusers/peft naming, 2 in diffusers/peft (no 'transformer.' prefix) "
               "naming, 3 in BFL/ComfyUI naming, 6 in kohya/sd-scripts naming, 3 in kohya-style diffusers "
               "(lora_transformer_*) naming and 2 in XLabs naming)" in n for n in info.notes), info.notes
    assert any("ignored 1 text-encoder" in n for n in info.notes)
    reported = {m: (alpha or r) for *_, alpha, m in layers}
    assert info.alpha == 1.0 and info.alphas == {m: a for m, a in reported.items() if a != 1.0}
    # the kohya block layer's (lora_transformer_* layers map one to one, their alphas as given)
    assert "those of 1 layer folded into the weights by diffusers' kohya converter" in info.alpha_source
    got = model.state_dict()
    assert set(got) == set(want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)

    unmerged = fresh_transformer()
    load_lora(unmerged, path)
    torch.testing.assert_close(run(unmerged, inputs), run(model, inputs), rtol=1e-5, atol=1e-5)
    factors, _ = merge_factors(fresh_transformer(), path)
    assert set(factors) == set(deltas)
    for key, (a, b, factor) in factors.items():
        torch.testing.assert_close(factor * b @ a, deltas[key], rtol=0, atol=1e-6, msg=key)


def test_mixed_namings_on_one_layer_are_refused(tmp_path, inputs):
    g = torch.Generator().manual_seed(47)
    a, b = _pair(g, 32, 32)
    diffusers = {"transformer.transformer_blocks.0.attn.to_out.0.lora_A.weight": a,
                 "transformer.transformer_blocks.0.attn.to_out.0.lora_B.weight": b}
    kohya = {"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": a.clone(),
             "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": b.clone(),
             "lora_unet_double_blocks_0_img_attn_proj.alpha": torch.tensor(1.0)}
    bare = {k[len("transformer."):]: v.clone() for k, v in diffusers.items()}
    model = fresh_transformer()
    base = run(model, inputs)
    with pytest.raises(LoraError, match=r"twice.safetensors mixes namings: 2 tensors in diffusers/peft naming "
                                        r"\(e\.g\. 'transformer\.transformer_blocks.*'\) and 3 in kohya/sd-scripts "
                                        r"naming \(e\.g\. 'lora_unet_double_blocks_0_img_attn_proj\..*'\), and both "
                                        r"change the layer 'transformer_blocks\.0\.attn\.to_out\.0'.*one naming"):
        load_lora(model, _save(tmp_path, "twice.safetensors", {**diffusers, **kohya}))
    _assert_untouched(model, inputs, base)
    with pytest.raises(LoraError, match=r"2 tensors in diffusers/peft naming .* and 2 in diffusers/peft \(no "
                                        r"'transformer\.' prefix\) naming .*both change the layer"):
        load_lora(model, _save(tmp_path, "bare.safetensors", {**diffusers, **bare}))

    # One alpha in the metadata of a mixed file: for which naming's layers is unknown.
    other = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a.clone(),
             "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b.clone()}
    for md, given in (({KEY_LORA_ALPHA: "8"}, "fluxsr.lora_alpha='8'"),
                      ({LORA_ADAPTER_METADATA_KEY: json.dumps({"transformer.lora_alpha": 8})},
                       "'lora_adapter_metadata' lora_alpha 8")):
        with pytest.raises(LoraError, match=r"mixes namings \(2 tensors in diffusers/peft naming and 3 in "
                                            r"kohya/sd-scripts naming\) and its metadata sets one LoRA alpha \("
                                            + re.escape(given) + r"\) without saying which layers"):
            load_lora(model, _save(tmp_path, "md.safetensors", {**other, **kohya}, metadata={"format": "pt", **md}))
    _assert_untouched(model, inputs, base)


def test_metadata_alphas_as_tensors_give_the_scaling_peft_applies(tmp_path, lora_file):
    """For loaders that read tensors only (ComfyUI's: alpha / rank from '.alpha' tensors, else 1):
    the alphas a diffusers/peft save keeps in its metadata, as tensors giving merge_factors' scaling."""
    g = torch.Generator().manual_seed(61)
    sd = {}
    for module in ("transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"):
        sd[f"transformer.{module}.lora_A.weight"], sd[f"transformer.{module}.lora_B.weight"] = _pair(g, 32, 32, r=4)
    for config, source in (({"r": 4, "lora_alpha": 8}, "'lora_adapter_metadata' metadata"),
                           ({"transformer.r": 4, "transformer.lora_alpha": 8, "transformer.alpha_pattern":
                             {"transformer_blocks.0.attn.to_k": 2}}, "'lora_adapter_metadata' metadata"),
                           ({"r": 4, "lora_alpha": 8, "use_rslora": True}, "'lora_adapter_metadata' metadata")):
        path = _save(tmp_path, "peft.safetensors", sd,
                     metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(config)})
        before = {k: v.clone() for k, v in sd.items()}
        alphas, said = alpha_tensors_from_metadata(path, sd)
        assert source in said and all(torch.equal(sd[k], before[k]) for k in sd) and len(sd) == len(before)
        factors, _ = merge_factors(fresh_transformer(), path)
        assert sorted(alphas) == ["transformer.transformer_blocks.0.attn.to_k.alpha",
                                  "transformer.transformer_blocks.0.attn.to_q.alpha"]
        for key, alpha in alphas.items():  # ComfyUI scales by alpha / rank
            module = key.removeprefix("transformer.").removesuffix(".alpha")
            assert float(alpha) / 4 == pytest.approx(factors[f"{module}.weight"][2], rel=1e-6), (config, key)
    assert "alpha 8" in alpha_tensors_from_metadata(path, sd)[1] and "rsLoRA" in alpha_tensors_from_metadata(path, sd)[1]
    # fluxsr.lora_alpha too; nothing for alpha tensors in the file, nothing said, or alpha = rank (our files)
    path = _save(tmp_path, "ours.safetensors", sd, metadata={"format": "pt", KEY_LORA_ALPHA: "2"})
    assert {float(v) for v in alpha_tensors_from_metadata(path, sd)[0].values()} == {2.0}
    with_alpha = {**sd, "transformer.transformer_blocks.0.attn.to_q.alpha": torch.tensor(8.0)}
    assert alpha_tensors_from_metadata(_save(tmp_path, "own.safetensors", with_alpha), with_alpha) == ({}, None)
    assert alpha_tensors_from_metadata(_save(tmp_path, "bare.safetensors", sd), sd) == ({}, None)
    ours = safetensors.torch.load_file(str(lora_file))
    assert alpha_tensors_from_metadata(lora_file, ours) == ({}, None)
    # a per-layer pattern (diffusers' names) over layers named otherwise: which alpha is whose is
    # known only after the naming is converted, which ComfyUI's loader never sees
    bfl = {"diffusion_model.double_blocks.0.img_attn.qkv.lora_A.weight": torch.zeros(4, 32),
           "diffusion_model.double_blocks.0.img_attn.qkv.lora_B.weight": torch.zeros(96, 4)}
    path = _save(tmp_path, "bfl.safetensors", bfl, metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps(
        {"r": 4, "lora_alpha": 8, "alpha_pattern": {"single_transformer_blocks.0.proj_out": 2}})})
    with pytest.raises(LoraError, match=r"alpha_pattern\) in diffusers naming, but its layers are named otherwise "
                                        r"\(e\.g\. diffusion_model\.double_blocks"):
        alpha_tensors_from_metadata(path, bfl)
    path = _save(tmp_path, "bfl_global.safetensors", bfl,
                 metadata={"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps({"r": 4, "lora_alpha": 8})})
    assert {k: float(v) for k, v in alpha_tensors_from_metadata(path, bfl)[0].items()} == {
        "diffusion_model.double_blocks.0.img_attn.qkv.alpha": 8.0}  # one alpha for all: no naming needed


def test_text_encoder_keys_next_to_diffusers_keys(tmp_path, inputs):
    """A diffusers-named LoRA with text_encoder.* keys: the transformer part loads, the rest is noted."""
    g = torch.Generator().manual_seed(53)
    a, b = _pair(g, 32, 32)
    sd = {"transformer.transformer_blocks.0.attn.to_q.lora_A.weight": a,
          "transformer.transformer_blocks.0.attn.to_q.lora_B.weight": b,
          "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_A.weight": torch.randn(2, 32, generator=g),
          "text_encoder.text_model.encoder.layers.0.mlp.fc1.lora_B.weight": torch.randn(64, 2, generator=g)}
    md = {"format": "pt", LORA_ADAPTER_METADATA_KEY: json.dumps({"transformer.r": 2, "transformer.lora_alpha": 4,
                                                                 "text_encoder.r": 2, "text_encoder.lora_alpha": 2})}
    model = fresh_transformer()
    info = load_lora(model, _save(tmp_path, "with-te.safetensors", sd, metadata=md), merge=True)
    assert info.target_modules == ["transformer_blocks.0.attn.to_q"] and info.alpha == 4.0
    assert any("ignored 2 text-encoder LoRA tensors" in n for n in info.notes)
    torch.testing.assert_close(model.transformer_blocks[0].attn.to_q.weight,
                               fresh_transformer().transformer_blocks[0].attn.to_q.weight + 2.0 * b @ a,
                               rtol=0, atol=1e-6)


# --- metadata ------------------------------------------------------------------------------

def test_metadata_round_trip(lora_file):
    md = safetensors.safe_open(str(lora_file), "pt").metadata()
    assert md[KEY_T_L] == "0.3" and md[KEY_LORA_RANK] == str(RANK) and float(md[KEY_LORA_ALPHA]) == RANK
    assert md["fluxsr.train_step"] == "1200"
    adapter = json.loads(md[LORA_ADAPTER_METADATA_KEY])
    assert adapter["transformer.r"] == RANK and adapter["transformer.lora_alpha"] == RANK
    keys = safetensors.safe_open(str(lora_file), "pt").keys()
    assert all(k.startswith("transformer.") and (".lora_A.weight" in k or ".lora_B.weight" in k)
               for k in keys)

    info = load_lora(fresh_transformer(), lora_file)
    s = info.settings
    assert (s.t_l, s.guidance, s.scale, s.lora_rank) == (0.3, 2.5, 2.0, RANK)
    assert all(str(lora_file) in s.source[f] for f in ("t_l", "guidance", "scale"))
    assert info.metadata["fluxsr.train_step"] == "1200"
    assert "student.safetensors" in info.describe()


def test_export_from_model_matches_peft(tmp_path, trained_lora):
    sd = lora_state_dict_from_model(trained_lora, "student")
    n_layers = sum(1 for m in trained_lora.modules() if hasattr(m, "lora_A"))
    assert len(sd) == 2 * n_layers
    a = sd["transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight"]
    assert torch.equal(a, trained_lora.single_transformer_blocks[0].attn.to_q.lora_A["student"].weight)
    assert adapter_rank_alpha(trained_lora, "student") == (RANK, ALPHA)
    path = save_lora_from_model(tmp_path / "x.safetensors", trained_lora, RunSettings(), "student")
    assert set(safetensors.torch.load_file(path)) == set(sd)
    with pytest.raises(LoraError, match="no LoRA adapter named 'nope'"):
        lora_state_dict_from_model(trained_lora, "nope")


def test_save_is_atomic_and_validated(tmp_path, trained_lora, monkeypatch):
    sd = lora_state_dict_from_model(trained_lora, "student")
    path = tmp_path / "out.safetensors"
    path.write_bytes(b"old")
    with pytest.raises(ValueError, match="not rank 8"):
        save_lora(path, sd, RunSettings(), rank=8, alpha=8)
    bad = dict(sd)
    bad.pop(next(k for k in bad if ".lora_B." in k))
    with pytest.raises(ValueError, match="no lora_B"):
        save_lora(path, bad, RunSettings(), rank=RANK, alpha=ALPHA)
    with pytest.raises(ValueError, match="may not set"):
        save_lora(path, sd, RunSettings(), RANK, ALPHA, extra_metadata={KEY_T_L: "0.5"})

    # A save that fails while writing leaves the old file and no temporary behind.
    def broken(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with monkeypatch.context() as m, pytest.raises(OSError, match="disk full"):
        m.setattr(safetensors.torch, "save_file", broken)
        save_lora(path, sd, RunSettings(), RANK, ALPHA)
    assert path.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["out.safetensors"]

    save_lora(path, sd, RunSettings(), RANK, ALPHA)
    assert set(safetensors.torch.load_file(str(path))) == set(sd)
    assert os.listdir(tmp_path) == ["out.safetensors"]


# --- errors --------------------------------------------------------------------------------

def _save(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    safetensors.torch.save_file(tensors, str(path), metadata=metadata or {"format": "pt"})
    return path


def _assert_untouched(model, inputs, base):
    assert not getattr(model, "peft_config", None)
    torch.testing.assert_close(run(model, inputs), base, rtol=0, atol=0)


def test_sd_unet_lora_is_named(tmp_path, inputs):
    path = _save(tmp_path, "sd.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4),
        "lora_unet_down_blocks_0_attentions_0_proj_in.alpha": torch.tensor(4.0),
    })
    model = fresh_transformer()
    base = run(model, inputs)
    with pytest.raises(LoraError, match="Stable Diffusion"):
        load_lora(model, path)
    _assert_untouched(model, inputs, base)

    sdxl = _save(tmp_path, "sdxl.safetensors", {
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 1280),
        "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(5120, 4)})
    with pytest.raises(LoraError, match="Stable Diffusion XL"):
        load_lora(fresh_transformer(), sdxl)


def test_keys_matching_no_module(tmp_path):
    path = _save(tmp_path, "other.safetensors", {
        "transformer.encoder.layer.0.query.lora_A.weight": torch.zeros(4, 32),
        "transformer.encoder.layer.0.query.lora_B.weight": torch.zeros(32, 4)})
    with pytest.raises(LoraError, match="none of its 1 LoRA layers exists in this transformer"):
        load_lora(fresh_transformer(), path)


def test_lora_for_wider_flux(tmp_path, inputs):
    """A LoRA made for FLUX.1 (hidden 3072) on a transformer of another width."""
    path = _save(tmp_path, "wide.safetensors", {
        "transformer.single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(64, 3072),
        "transformer.single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 64)})
    model = fresh_transformer()
    base = run(model, inputs)
    with pytest.raises(LoraError, match=r"maps 3072 -> 3072 features.*maps 32 -> 32.*hidden size 32"):
        load_lora(model, path)
    _assert_untouched(model, inputs, base)


def test_lora_for_deeper_flux(tmp_path, lora_file):
    lora = safetensors.torch.load_file(str(lora_file))
    lora["transformer.transformer_blocks.18.attn.to_q.lora_A.weight"] = torch.zeros(RANK, 32)
    lora["transformer.transformer_blocks.18.attn.to_q.lora_B.weight"] = torch.zeros(32, RANK)
    path = _save(tmp_path, "deep.safetensors", lora)
    with pytest.raises(LoraError, match=r"19 double / 1 single blocks; this transformer has 1 / 1"):
        load_lora(fresh_transformer(), path)


def test_unpaired_and_inconsistent_shapes(tmp_path):
    key = "transformer.single_transformer_blocks.0.attn.to_q"
    p1 = _save(tmp_path, "half.safetensors", {f"{key}.lora_A.weight": torch.zeros(4, 32)})
    with pytest.raises(LoraError, match="has lora_A but no lora_B"):
        load_lora(fresh_transformer(), p1)
    p2 = _save(tmp_path, "skew.safetensors", {f"{key}.lora_A.weight": torch.zeros(4, 32),
                                              f"{key}.lora_B.weight": torch.zeros(32, 8)})
    with pytest.raises(LoraError, match="do not form a low-rank pair"):
        load_lora(fresh_transformer(), p2)


def test_empty_full_model_missing_and_pickle(tmp_path):
    empty = _save(tmp_path, "empty.safetensors", {})
    with pytest.raises(LoraError, match="empty"):
        load_lora(fresh_transformer(), empty)

    full = _save(tmp_path, "model.safetensors", fresh_transformer().state_dict())
    with pytest.raises(LoraError, match="this is a full model, not a LoRA"):
        load_lora(fresh_transformer(), full)

    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        load_lora(fresh_transformer(), tmp_path / "nothere.safetensors")

    pt = tmp_path / "lora.bin"
    torch.save({"a": torch.zeros(1)}, pt)
    with pytest.raises(UnsafeWeightsError, match="pickle"):
        load_lora(fresh_transformer(), pt)

    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 64)
    with pytest.raises(CorruptWeightsError, match="not a safetensors file"):
        load_lora(fresh_transformer(), junk)

    with pytest.raises(LoraError, match="is a folder"):
        load_lora(fresh_transformer(), tmp_path)


def test_adapter_name_clash_and_merge_over_adapter(lora_file):
    model = fresh_transformer()
    load_lora(model, lora_file)
    with pytest.raises(LoraError, match="already has an adapter named 'fluxsr'"):
        load_lora(model, lora_file)
    with pytest.raises(LoraError, match="merge=True needs a transformer without LoRA adapters"):
        load_lora(model, lora_file, merge=True, adapter_name="other")


@pytest.mark.filterwarnings("ignore:.*invalid shape")
def test_lora_with_bias_terms(tmp_path, inputs):
    """peft's lora_bias (a bias on lora_B) is detected from the keys and loaded, not dropped."""
    from peft.utils import get_peft_model_state_dict

    model = fresh_transformer()
    model.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "proj_out"],
                                 lora_bias=True), adapter_name="biased")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape) * 0.2)
    sd = {"transformer." + k: v for k, v in get_peft_model_state_dict(model, adapter_name="biased").items()}
    assert any(k.endswith("lora_B.bias") for k in sd)
    path = _save(tmp_path, "bias.safetensors", sd)

    ref = run(model, inputs)
    assert (ref - run(fresh_transformer(), inputs)).abs().max() > 1e-2
    separate, merged = fresh_transformer(), fresh_transformer()
    load_lora(separate, path)
    load_lora(merged, path, merge=True)
    torch.testing.assert_close(run(separate, inputs), ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(run(merged, inputs), ref, rtol=0, atol=1e-5)


def test_small_lora_header_is_not_taken_for_a_pickle(tmp_path):
    """A valid safetensors file whose 8-byte header length reads 0x80 0x00... (128 bytes) starts
    like a protocol-0 pickle opcode pair; the file must still be read as safetensors."""
    key = "transformer.single_transformer_blocks.0.attn.to_q"
    path = tmp_path / "small.safetensors"
    safetensors.torch.save_file({f"{key}.lora_A.weight": torch.zeros(4, 32)}, str(path))
    assert path.read_bytes()[:9] == b"\x80" + b"\x00" * 7 + b"{"  # header length 128
    with pytest.raises(LoraError, match="has lora_A but no lora_B"):  # read, then judged as a LoRA
        load_lora(fresh_transformer(), path)


def test_a_peft_save_pretrained_folder_gets_its_alpha_from_adapter_config_json(tmp_path):
    """peft's save_pretrained keeps lora_alpha in adapter_config.json beside
    adapter_model.safetensors, not in the file: it was read as alpha = rank, so an r=4, alpha=16
    LoRA ran at a quarter of its strength. Merged here, it equals peft's own merge."""
    import json

    from peft import LoraConfig, get_peft_model

    model = get_peft_model(fresh_transformer(), LoraConfig(r=4, lora_alpha=16, target_modules=["to_q", "to_k"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    folder = tmp_path / "peft_save"
    model.save_pretrained(folder)
    assert json.loads((folder / "adapter_config.json").read_text())["lora_alpha"] == 16
    want = model.merge_and_unload().state_dict()
    merged = fresh_transformer()
    info = load_lora(merged, folder / "adapter_model.safetensors", merge=True)
    assert "alpha 16 (adapter_config.json beside it)" in info.describe()
    for key in ("transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_k.weight"):
        torch.testing.assert_close(merged.state_dict()[key], want[key], atol=1e-6, rtol=1e-5)
    (folder / "adapter_config.json").write_text("{not json")  # said, and alpha = rank as before
    info = load_lora(fresh_transformer(), folder / "adapter_model.safetensors", merge=True)
    assert "alpha 4 (none in the file" in info.describe()
    assert any("ignored adapter_config.json beside it: it cannot be read" in n for n in info.notes)


def test_kohya_style_diffusers_names_reach_every_linear_layer(tmp_path):
    """OneTrainer's and ai-toolkit's lora_transformer_<module> layers outside attention
    (ff.net.0.proj, proj_mlp, norm1.linear) went, through diffusers' converter, to their block
    and the file was refused ("targets a FluxTransformerBlock"); each now merges as by hand,
    with its own alpha."""
    g = torch.Generator().manual_seed(44)
    base = fresh_transformer().state_dict()
    modules = {"transformer_blocks.0.ff.net.0.proj": 4.0, "single_transformer_blocks.0.proj_mlp": None,
               "transformer_blocks.0.norm1.linear": 1.0, "transformer_blocks.0.attn.to_q": 2.0}
    r, sd, want = 2, {}, dict(base)
    for module, alpha in modules.items():
        out_f, in_f = base[f"{module}.weight"].shape
        a, b = _pair(g, out_f, in_f, r)
        stem = "lora_transformer_" + module.replace(".", "_")
        sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = a, b
        if alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(alpha)
        want[f"{module}.weight"] = base[f"{module}.weight"] + ((alpha or r) / r) * b @ a
    model = fresh_transformer()
    info = load_lora(model, _save(tmp_path, "onetrainer.safetensors", sd), merge=True)
    assert info.target_modules == sorted(modules)
    got = model.state_dict()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)
    sd["lora_transformer_transformer_blocks_0_attn_to_nothing.lora_down.weight"] = torch.zeros(2, 4)
    sd["lora_transformer_transformer_blocks_0_attn_to_nothing.lora_up.weight"] = torch.zeros(4, 2)
    with pytest.raises(LoraError, match="'lora_transformer_transformer_blocks_0_attn_to_nothing' names no linear layer"):
        load_lora(fresh_transformer(), _save(tmp_path, "other.safetensors", sd))
