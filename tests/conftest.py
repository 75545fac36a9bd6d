"""Shared fixtures: tiny random FLUX-architecture model files in every format users have."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@dataclass
class TinyModelFiles:
    transformer: Path     # BFL-keyed single safetensors file (as flux1-dev.safetensors)
    vae: Path             # ae.safetensors-keyed single file
    lora: Path            # FluxSR LoRA, diffusers naming, with fluxsr.* metadata (t_l 0.3)
    conditioning: Path    # our bundle (.safetensors), guidance 2.0


def _make_tiny_files(folder: Path) -> TinyModelFiles:
    import safetensors.torch
    from peft import LoraConfig

    from fluxsr_core import bundle, lora, models, weights
    from fluxsr_core.settings import RunSettings

    transformer = models.load_transformer("tiny", dtype=torch.float32, seed=0)
    sd = weights.transformer_state_dict_to_bfl(transformer.state_dict())
    safetensors.torch.save_file({k: v.contiguous() for k, v in sd.items()}, folder / "flux-tiny.safetensors")

    vae = models.load_vae("tiny", dtype=torch.float32, seed=0)
    vsd = weights.vae_state_dict_to_bfl(vae.state_dict())
    safetensors.torch.save_file({k: v.contiguous() for k, v in vsd.items()}, folder / "ae-tiny.safetensors")

    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "proj_out"],
                                       init_lora_weights=False), adapter_name="fluxsr")
    settings = RunSettings(t_l=0.3, guidance=2.0, scale=4.0, source={})
    lora.save_lora_from_model(folder / "fluxsr-lora.safetensors", transformer, settings)

    g = torch.Generator().manual_seed(0)
    cfg = transformer.config
    bundle.save_bundle(folder / "fluxsr-bundle.safetensors",
                       torch.randn(1, 8, cfg.joint_attention_dim, generator=g),
                       torch.randn(1, cfg.pooled_projection_dim, generator=g), settings, prompt="tiny test")
    return TinyModelFiles(folder / "flux-tiny.safetensors", folder / "ae-tiny.safetensors",
                          folder / "fluxsr-lora.safetensors", folder / "fluxsr-bundle.safetensors")


# What city96's patched llama-quantize leaves unquantised in a FLUX file (ComfyUI-GGUF's
# tools/lcpp.patch): they stay as in the BF16 file convert.py wrote first.
GGUF_FLUX_UNQUANTISED = ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer.")


def write_gguf(state_dict: dict, path: Path, qtype_name: str = "Q8_0") -> dict:
    """``state_dict`` (BFL keys) as a GGUF file by the rules of ComfyUI-GGUF's ``tools/convert.py``
    and its llama-quantize patch (architecture "flux"; 1-D tensors and those of at most 1024
    elements in F32, the layers of :data:`GGUF_FLUX_UNQUANTISED` in BF16, the rest in
    ``qtype_name``); returns the dequantised tensors as diffusers computes with them (fp32;
    Q8_0's fp16 scale times its int8 values is a product in fp16 there, so rounded to fp16)."""
    import gguf
    import numpy as np

    qtype = gguf.GGMLQuantizationType[qtype_name]
    packed_tensors, dequantized = {}, {}
    for key, tensor in state_dict.items():
        data = tensor.to(torch.float32).numpy()
        if data.ndim == 1 or data.size <= 1024:
            kind = gguf.GGMLQuantizationType.F32
        elif key.startswith(GGUF_FLUX_UNQUANTISED):
            kind = gguf.GGMLQuantizationType.BF16
        else:
            kind = qtype
        packed = gguf.quants.quantize(data, kind)
        packed_tensors[key] = (packed, kind)
        exact = torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(packed, kind)).reshape(data.shape))
        dequantized[key] = exact.half().float() if kind == gguf.GGMLQuantizationType.Q8_0 else exact
    save_gguf(path, packed_tensors)
    return dequantized


def save_gguf(path: Path, packed_tensors: dict) -> None:
    """A GGUF file (architecture "flux") of ``{name: (packed numpy array, GGMLQuantizationType)}``."""
    import gguf

    writer = gguf.GGUFWriter(path=None, arch="flux")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, (packed, kind) in packed_tensors.items():
        writer.add_tensor(key, packed, raw_dtype=kind)
    writer.write_header_to_file(path=str(path))
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def gguf_writer():
    """:func:`write_gguf`, for tests that write GGUF files of their own."""
    pytest.importorskip("gguf")
    return write_gguf


@pytest.fixture(scope="session")
def gguf_saver():
    """:func:`save_gguf`, for tests that pack GGUF tensors of their own."""
    pytest.importorskip("gguf")
    return save_gguf


@dataclass
class TinyGgufFiles:
    gguf: Path          # the tiny transformer of tiny_model_files as a Q8_0 GGUF (BFL keys)
    dequantized: Path   # the weights diffusers computes it with, as a BFL safetensors file (fp32)


@pytest.fixture(scope="session")
def tiny_gguf_files(tiny_model_files, tmp_path_factory) -> TinyGgufFiles:
    """The tiny transformer quantised as city96's FLUX GGUF files are (needs the gguf package)."""
    pytest.importorskip("gguf")
    import safetensors.torch

    folder = tmp_path_factory.mktemp("tiny-gguf")
    sd = safetensors.torch.load_file(str(tiny_model_files.transformer))
    dequantized = write_gguf(sd, folder / "flux-tiny-Q8_0.gguf")
    safetensors.torch.save_file(dequantized, folder / "flux-tiny-Q8_0-dequantized.safetensors")
    return TinyGgufFiles(folder / "flux-tiny-Q8_0.gguf", folder / "flux-tiny-Q8_0-dequantized.safetensors")


class LosslessCodec:
    """A stand-in VAE that loses nothing: 8x8 pixel blocks <-> 192 latent channels. With a zero
    velocity an upscale through it is exactly the resize, so what the pipeline around the model
    does to the pixels can be checked to the last bit."""

    downscale, latent_channels = 8, 192

    def encode(self, image):
        return torch.nn.functional.pixel_unshuffle(image, 8)

    def decode(self, latent):
        return torch.nn.functional.pixel_shuffle(latent, 8)


@pytest.fixture
def lossless_codec() -> LosslessCodec:
    """:class:`LosslessCodec`."""
    return LosslessCodec()


@pytest.fixture
def one_thread():
    """Tiny models on a small shared machine: one thread is fastest (use via pytestmark)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model_files(tmp_path_factory) -> TinyModelFiles:
    """Tiny random models saved as a user would have them (BFL files, LoRA, bundle)."""
    return _make_tiny_files(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session")
def photo_png(tmp_path_factory) -> Path:
    """A real photo (scikit-image's astronaut) downscaled to 40x32, as PNG."""
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.astronaut()).resize((40, 32), Image.LANCZOS)
    path = tmp_path_factory.mktemp("photos") / "astronaut.png"
    img.save(path)
    return path


# --- the latent-diffusion VAE layout (BFL's ae.safetensors, ComfyUI's comfy.ldm ... model.py) -------

class _LdmResnet(torch.nn.Module):
    """A diffusers ResnetBlock2D's modules under latent-diffusion names, run as there."""

    def __init__(self, r):
        super().__init__()
        self.norm1, self.conv1, self.norm2, self.conv2, self.dropout = r.norm1, r.conv1, r.norm2, r.conv2, r.dropout
        self.in_channels, self.out_channels, self.use_conv_shortcut = r.in_channels, r.out_channels, False
        if r.conv_shortcut is not None:
            self.nin_shortcut = r.conv_shortcut

    def forward(self, x, temb=None):
        f = torch.nn.functional.silu
        h = self.conv2(self.dropout(f(self.norm2(self.conv1(f(self.norm1(x)))))))
        return (self.nin_shortcut(x) if self.in_channels != self.out_channels else x) + h


class _LdmAttn(torch.nn.Module):
    def __init__(self, attention):
        super().__init__()
        self.attention = attention

    def forward(self, x):
        return self.attention(x)


def _ldm_mid(mid_block):
    mid = torch.nn.Module()
    mid.block_1, mid.attn_1 = _LdmResnet(mid_block.resnets[0]), _LdmAttn(mid_block.attentions[0])
    mid.block_2 = _LdmResnet(mid_block.resnets[1])
    return mid


class _LdmEncoder(torch.nn.Module):
    def __init__(self, enc):
        super().__init__()
        self.conv_in, self.norm_out, self.conv_out = enc.conv_in, enc.conv_norm_out, enc.conv_out
        self.num_resolutions, self.num_res_blocks = len(enc.down_blocks), len(enc.down_blocks[0].resnets)
        self.down = torch.nn.ModuleList()
        for block in enc.down_blocks:
            level = torch.nn.Module()
            level.block, level.attn = torch.nn.ModuleList(_LdmResnet(r) for r in block.resnets), torch.nn.ModuleList()
            if block.downsamplers:
                level.downsample = block.downsamplers[0]
            self.down.append(level)
        self.mid = _ldm_mid(enc.mid_block)

    def forward(self, x):
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h, None)
            if i != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h, None)), None)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


class _LdmDecoder(torch.nn.Module):
    def __init__(self, dec):
        super().__init__()
        self.conv_in, self.norm_out, self.conv_out = dec.conv_in, dec.conv_norm_out, dec.conv_out
        self.num_resolutions, self.num_res_blocks = len(dec.up_blocks), len(dec.up_blocks[0].resnets) - 1
        self.mid = _ldm_mid(dec.mid_block)
        levels = []
        for block in dec.up_blocks:  # diffusers' up_blocks[k] is level num_resolutions - 1 - k
            level = torch.nn.Module()
            level.block, level.attn = torch.nn.ModuleList(_LdmResnet(r) for r in block.resnets), torch.nn.ModuleList()
            if block.upsamplers:
                level.upsample = block.upsamplers[0]
            levels.append(level)
        self.up = torch.nn.ModuleList(reversed(levels))

    def forward(self, z, **kwargs):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z), None)), None)
        for i_level in reversed(range(self.num_resolutions)):
            for block in self.up[i_level].block:
                h = block(h, None)
            if i_level != 0:
                h = self.up[i_level].upsample(h)
        return self.conv_out(torch.nn.functional.silu(self.norm_out(h)))


@pytest.fixture(scope="session")
def ldm_layout():
    """``make(diffusers_vae) -> (encoder, decoder)``: the VAE's own modules rearranged in the
    latent-diffusion layout ComfyUI builds (down[i].block[j], mid.block_1, up[i].upsample ...),
    computing what the diffusers VAE computes."""
    return lambda vae: (_LdmEncoder(vae.encoder).eval(), _LdmDecoder(vae.decoder).eval())
