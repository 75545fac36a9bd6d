"""Conditioning bundles: our safetensors form, the third-party .pth folder form, prompt encoding."""

from __future__ import annotations

import builtins
import json
import os

import pytest
import safetensors.torch
import torch

from fluxsr_core.bundle import (
    CLIP_FILE,
    CONFIG_FILE,
    T5_FILE,
    BundleError,
    ConditioningBundle,
    encode_prompt_bundle,
    load_bundle,
    read_training_config,
    save_bundle,
)
from fluxsr_core.interfaces import Conditioning
from fluxsr_core.settings import KEY_T_L, RunSettings
from fluxsr_core.weights import CorruptWeightsError, UnsafeWeightsError

T5_W, CLIP_W, L = 32, 16, 7  # the tiny test models' widths


def tensors(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, L, T5_W, generator=g).to(dtype), torch.randn(1, CLIP_W, generator=g).to(dtype)


# --- our safetensors form --------------------------------------------------------------------

def test_save_load_round_trip(tmp_path):
    t5, clip = tensors()
    path = tmp_path / "sub" / "bundle.safetensors"
    settings = RunSettings(t_l=0.4, guidance=2.0, scale=2.0)
    assert save_bundle(path, t5, clip, settings, prompt="a sharp photo") == str(path)

    b = load_bundle(path)
    assert torch.equal(b.t5, t5) and torch.equal(b.clip_pooled, clip)
    assert (b.settings.t_l, b.settings.guidance, b.settings.scale) == (0.4, 2.0, 2.0)
    assert all(str(path) in b.settings.source[k] for k in ("t_l", "guidance", "scale"))
    assert b.source == str(path)
    assert any("a sharp photo" in line for line in b.report)
    assert os.listdir(path.parent) == ["bundle.safetensors"]  # no temporary left behind

    cond = b.to_conditioning()
    assert isinstance(cond, Conditioning) and cond.guidance == 2.0 and cond.t5 is b.t5
    assert b.to_conditioning(guidance=5.0).guidance == 5.0

    # unbatched tensors are normalised on save; bf16 is kept as stored
    t5b, clipb = tensors(1, torch.bfloat16)
    save_bundle(path, t5b[0], clipb[0], RunSettings())
    b2 = load_bundle(path)
    assert b2.t5.shape == (1, L, T5_W) and b2.clip_pooled.shape == (1, CLIP_W)
    assert b2.t5.dtype == torch.bfloat16 and torch.equal(b2.t5, t5b)
    assert b2.settings.source["t_l"] == f"bundle {path}"  # written settings, even defaults, are the file's


def test_widths_checked_against_a_transformer(tmp_path):
    t5, clip = tensors()
    path = save_bundle(tmp_path / "b.safetensors", t5, clip, RunSettings())
    b = load_bundle(path)
    b.check_fits({"joint_attention_dim": T5_W, "pooled_projection_dim": CLIP_W})
    with pytest.raises(BundleError, match=r"t5 is 32 wide, the transformer takes 4096.*clip_pooled is 16 wide"):
        b.check_fits({"joint_attention_dim": 4096, "pooled_projection_dim": 768})
    # a config.json without the keys builds diffusers' defaults (4096, 768): checked against those
    with pytest.raises(BundleError, match=r"t5 is 32 wide, the transformer takes 4096.*clip_pooled is 16 wide, the "
                                          r"transformer takes 768"):
        b.check_fits({"num_layers": 19})
    from fluxsr_core.bundle import conditioning_width_problems

    assert conditioning_width_problems(torch.zeros(1, 8, 4096), torch.zeros(1, 768), {"num_layers": 19}) == []
    with pytest.raises(BundleError, match=r"b.safetensors.*expected width 4096"):
        load_bundle(path, t5_width=4096)
    assert load_bundle(path, t5_width=T5_W, clip_width=CLIP_W).t5.shape[-1] == T5_W


def test_safetensors_that_is_not_a_bundle(tmp_path):
    lora = tmp_path / "lora.safetensors"
    safetensors.torch.save_file({"transformer.x.lora_A.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(BundleError, match="looks like a LoRA"):
        load_bundle(lora)
    only_t5 = tmp_path / "half.safetensors"
    safetensors.torch.save_file({"t5": torch.zeros(1, 3, 4)}, str(only_t5))
    with pytest.raises(BundleError, match="no 'clip_pooled' tensor"):
        load_bundle(only_t5)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"\x00" * 40)
    with pytest.raises(CorruptWeightsError, match="junk.safetensors"):
        load_bundle(junk)
    with pytest.raises(FileNotFoundError, match="nothing.safetensors"):
        load_bundle(tmp_path / "nothing.safetensors")


# --- the third-party folder form -------------------------------------------------------------

def write_folder(folder, t5, clip, config=None):
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(t5, folder / T5_FILE)
    torch.save(clip, folder / CLIP_FILE)
    if config is not None:
        (folder / CONFIG_FILE).write_text(json.dumps(config) if not isinstance(config, str) else config)
    return folder


def test_pth_folder_with_training_config(tmp_path):
    t5, clip = tensors(2)
    folder = write_folder(tmp_path / "release", t5[0], clip, {
        "T_L": 0.3, "guidance_scale": 3.0, "sr_scale": 4, "learning_rate": 5e-5,
        "optim": {"betas": [0.9, 0.99]}, "rank": 64})

    b = load_bundle(folder)
    assert torch.equal(b.t5, t5) and torch.equal(b.clip_pooled, clip)
    assert (b.settings.t_l, b.settings.guidance, b.settings.scale) == (0.3, 3.0, 4.0)
    assert CONFIG_FILE in b.settings.source["t_l"] and str(folder) in b.settings.source["t_l"]
    assert b.source == str(folder)
    unknown = [line for line in b.report if "keys not used" in line]
    assert len(unknown) == 1 and all(k in unknown[0] for k in ("learning_rate", "optim.betas", "rank"))

    # either .pth file names the folder too
    for name in (T5_FILE, CLIP_FILE):
        assert torch.equal(load_bundle(folder / name).t5, t5)


def test_training_config_is_read_tolerantly(tmp_path):
    cfg = tmp_path / CONFIG_FILE
    cfg.write_text(json.dumps({"timestep": 250, "guidance": "2.5", "upscale": 2, "train": {"tl": 0.2}}))
    md, report = read_training_config(str(cfg))
    # 250 is not in (0, 1): reported with the 0-1000 reading, and the nested tl=0.2 is used.
    assert md[KEY_T_L] == "0.2" and md["fluxsr.guidance"] == "2.5" and md["fluxsr.scale"] == "2.0"
    assert any("timestep=250" in line and "0.25" in line for line in report)

    cfg.write_text("{not json")
    md, report = read_training_config(str(cfg))
    assert md == {} and "could not be read" in report[0]

    t5, clip = tensors(3)
    folder = write_folder(tmp_path / "bad", t5, clip, "[1, 2]")
    b = load_bundle(folder)  # an unusable config is reported, not fatal
    assert b.settings.t_l == 0.25 and b.settings.source["t_l"] == "default"
    assert any("not an object" in line for line in b.report)
    assert any("defaults used" in line for line in b.report)


def test_pth_payload_shapes(tmp_path):
    t5, clip = tensors(4)
    # dicts of tensors (named like diffusers' outputs), lists, and a pooled vector stored [1, 1, D]
    folder = tmp_path / "dicts"
    folder.mkdir()
    torch.save({"prompt_embeds": t5, "attention_mask": torch.ones(1, L)}, folder / T5_FILE)
    torch.save([clip.unsqueeze(1)], folder / CLIP_FILE)
    b = load_bundle(folder)
    assert torch.equal(b.t5, t5) and torch.equal(b.clip_pooled, clip)

    cases = [
        ("swapped", clip[0], t5, r"t5_embedding.pth: T5 embeddings have shape \[16\]; expected \[1, L, 4096\].*swapped"),
        ("tokens", t5, torch.randn(1, 77, CLIP_W), r"clip_embedding.pth: the pooled CLIP embedding has shape \[1, 77, 16\].*per-token"),
        ("batch", torch.randn(2, L, T5_W), clip, r"shape \[2, 7, 32\].*2 prompts"),
        ("ints", torch.zeros(1, L, T5_W, dtype=torch.int64), clip, r"not a floating-point tensor"),
        ("nan", torch.full((1, L, T5_W), float("nan")), clip, r"NaN"),
    ]
    for name, a, c, msg in cases:
        with pytest.raises(BundleError, match=msg):
            load_bundle(write_folder(tmp_path / name, a, c))

    many = tmp_path / "many"
    many.mkdir()
    torch.save({"a": t5, "b": t5}, many / T5_FILE)
    torch.save(clip, many / CLIP_FILE)
    with pytest.raises(BundleError, match=r"several tensors \['a', 'b'\]"):
        load_bundle(many)


def test_missing_files_are_named(tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    torch.save(torch.zeros(1, 3, 4), folder / T5_FILE)
    with pytest.raises(FileNotFoundError, match=f"lacks {CLIP_FILE}"):
        load_bundle(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=f"lacks {T5_FILE} and {CLIP_FILE}"):
        load_bundle(empty)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_bundle(tmp_path / "nowhere")
    (folder / CLIP_FILE).write_bytes(b"PK\x03\x04 cut short")  # a truncated download
    with pytest.raises(CorruptWeightsError, match="clip_embedding.pth is truncated"):
        load_bundle(folder)


class _Payload:
    """Unpickling this would open (create) a file: the proof that nothing is executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (self.marker, "w"))


def _evil_helper():  # a function reference inside a pickle
    return 1


@pytest.mark.parametrize("payload", ["instance", "in_dict", "function", "non_tensor_value"])
def test_pickles_holding_objects_are_refused_unexecuted(tmp_path, payload):
    marker = tmp_path / "pwned.txt"
    t5, clip = tensors(5)
    folder = tmp_path / "evil"
    folder.mkdir()
    obj = {"instance": _Payload(str(marker)),
           "in_dict": {"t5": t5, "x": _Payload(str(marker))},
           "function": _evil_helper,
           "non_tensor_value": {"t5": t5, "step": 5}}[payload]
    torch.save(obj, folder / T5_FILE)
    torch.save(clip, folder / CLIP_FILE)
    # a plain (unsafe) unpickle of the same file would run the payload
    if payload == "instance":
        torch.load(folder / T5_FILE, weights_only=False)
        assert marker.exists()
        marker.unlink()

    with pytest.raises(UnsafeWeightsError, match=r"t5_embedding.pth (holds more than tensors|is a dict whose entries)"):
        load_bundle(folder)
    assert not marker.exists()


# --- encoding a prompt as FluxPipeline does --------------------------------------------------

def _tokenizer(max_len):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = "a photo of high quality sharp detailed clean image texture with fine details".split()
    vocab = {"[PAD]": 0, "[UNK]": 1}
    vocab.update({w: i + 2 for i, w in enumerate(words)})
    eos = len(vocab)
    vocab["</s>"] = eos  # the highest id, as CLIP's end token is
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", eos)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", eos_token="</s>",
                                   unk_token="[UNK]", model_max_length=max_len), len(vocab), eos


@pytest.fixture(scope="module")
def encoders():
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip_tok, vocab, eos = _tokenizer(77)
    t5_tok, _, _ = _tokenizer(512)
    torch.manual_seed(0)
    t5 = T5EncoderModel(T5Config(vocab_size=vocab, d_model=T5_W, d_kv=8, d_ff=64, num_layers=2,
                                 num_heads=4, pad_token_id=0, eos_token_id=eos)).eval()
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=vocab, hidden_size=CLIP_W, intermediate_size=32,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        max_position_embeddings=77, pad_token_id=0,
                                        eos_token_id=eos, bos_token_id=eos)).eval()
    return t5, t5_tok, clip, clip_tok


def test_encode_prompt_matches_flux_pipeline(encoders, tmp_path):
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from importlib import resources

    t5, t5_tok, clip, clip_tok = encoders
    cfg = lambda n: {k: v for k, v in json.loads(  # noqa: E731
        resources.files("fluxsr_core.configs").joinpath(n).read_text()).items() if not k.startswith("_")}
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(),
                        vae=AutoencoderKL.from_config(cfg("tiny-vae.json")),
                        text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5, tokenizer_2=t5_tok,
                        transformer=FluxTransformer2DModel.from_config(cfg("tiny-transformer.json")))
    prompt = "a sharp photo of fine texture with clean details"
    with torch.no_grad():  # as FluxPipeline.__call__ runs it
        want_t5, want_pooled, _ = pipe.encode_prompt(prompt, prompt_2=None, device=torch.device("cpu"),
                                                     max_sequence_length=24)

    settings = RunSettings(t_l=0.3)
    b = encode_prompt_bundle(prompt, t5, t5_tok, clip, clip_tok, settings, max_sequence_length=24)
    assert b.t5.shape == (1, 24, T5_W) and b.clip_pooled.shape == (1, CLIP_W)
    assert torch.equal(b.t5, want_t5) and torch.equal(b.clip_pooled, want_pooled)
    assert b.settings is settings and prompt[:20] in b.source

    # ... and by hand: T5 last hidden state over max-length padding; CLIP's pooler_output (EOS token)
    ids = t5_tok([prompt], padding="max_length", max_length=24, truncation=True, return_tensors="pt").input_ids
    cids = clip_tok([prompt], padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(b.t5, t5(ids)[0])
        hidden = clip(cids).last_hidden_state
    assert torch.equal(b.clip_pooled, hidden[:, int((cids[0] == clip_tok.eos_token_id).nonzero()[0])])

    # a long prompt is cut, and the bundle says so
    long = " ".join(["sharp"] * 40)
    b_long = encode_prompt_bundle(long, t5, t5_tok, clip, clip_tok, settings, max_sequence_length=8)
    assert b_long.t5.shape[1] == 8 and any("truncated to 8 T5 tokens" in x for x in b_long.report)

    # the encoded bundle round-trips through a file
    path = save_bundle(tmp_path / "enc.safetensors", b.t5, b.clip_pooled, settings, prompt=prompt)
    back = load_bundle(path)
    assert torch.equal(back.t5, b.t5) and back.settings.t_l == 0.3
    assert isinstance(back, ConditioningBundle)
