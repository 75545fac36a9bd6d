"""Smoke check of the benchmark's --tiny mode: the whole path runs and the report is complete.
Nothing about time is asserted (timing belongs to bench/, not to tests)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def load_bench(name="fluxsr_bench_run"):
    spec = importlib.util.spec_from_file_location(name, BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_tiny_benchmark_writes_a_complete_report(tmp_path):
    bench = load_bench()
    assert bench.main(["--tiny", "--out", str(tmp_path), "--teacher-steps", "3"]) == 0
    report = json.loads((tmp_path / "bench-tiny.json").read_text())
    assert set(report["upscale"][0]["parts_s"]) == {"resize_pad", "vae_encode", "transformer_tiled",
                                                    "vae_decode", "color_fix"}
    assert report["teacher"]["steps"] == 3 and report["memory"]["method"]
    # the 4x upscale again with the VAE's whole-image activations held to the base size's
    memory = report["memory"]
    assert memory["four_x_limited_bytes"] > 0 and memory["four_x_limited_upscale_s"] > 0
    assert memory["ratio_limited"] == pytest.approx(memory["four_x_limited_bytes"] / memory["base_bytes"])
    assert "held to the base size's" in (tmp_path / "bench-tiny.md").read_text()
    assert all(u["total_image_on_device_s"] > 0 and u["device"] == "cpu" for u in report["upscale"])
    assert "image on the device" in (tmp_path / "bench-tiny.md").read_text()
    # tiling's own cost is split out (issue 5): the tiled transformer less its tiles' forwards
    for u in report["upscale"]:
        assert u["tile_forward_s"] > 0
        assert u["tiling_overhead_s"] == pytest.approx(u["parts_s"]["transformer_tiled"] - u["tiles"] * u["tile_forward_s"])
    assert "| of it tiling overhead |" in (tmp_path / "bench-tiny.md").read_text()
    # --tiny keeps the whole full-size path running: two sizes, efficiency, every memory mode
    assert len(report["upscale"]) == 2 and report["transformer_efficiency"]["flops"] > 0
    eff = report["transformer_efficiency"]
    assert eff["flops_counted"] == pytest.approx(eff["flops"], rel=0.1)  # tiny: modulation and embedders weigh more
    assert eff["upscale_over_transformer_flops"] > 1 and eff["vae"]["vae_decode"]["flops"] > 0
    assert eff["upscale_over_transformer_image_on_device"] == pytest.approx(
        report["upscale"][0]["total_image_on_device_s"] / report["upscale"][0]["parts_s"]["transformer_tiled"])
    assert set(report["memory_modes"]) == {"none", "fp8_storage", "fp8_storage_all", "model_offload", "group_offload",
                                           "gguf_q8_0"}
    assert all(v["out"] == 128 for v in report["memory_modes"].values())  # at the larger size
    loaded = report["load_from_file"]
    assert loaded["file_bytes"] > 0
    assert loaded["none"]["parameters_on"] == loaded["fp8_storage_all"]["parameters_on"] == ["cpu"]
    assert loaded["fp8_storage_all"]["weights_bytes"] < 0.6 * loaded["none"]["weights_bytes"]
    assert report["tiling_throughput"]["tiles"] == 9 and report["tiling_throughput"]["tiled_over_untiled"] > 0
    assert report["tiling_throughput"]["flops_tiled_over_untiled"] > 1  # tiny: overlaps dominate
    vae_tiles = report["vae_tiling"]["variants"]  # 128 px in 64 px tiles (raised to hold the halos); no stash on CPU
    assert set(vae_tiles) == {"untiled", "per_tile", "whole_image"} and vae_tiles["untiled"]["latent_rel_l2"] == 0
    # the untiled result up to rounding (halos of the convolutions' reach), per-tile tiling far from it
    assert vae_tiles["whole_image"]["latent_rel_l2"] < 1e-5 < vae_tiles["per_tile"]["latent_rel_l2"]
    assert vae_tiles["whole_image"]["image_mean_levels"] < 1e-3 < vae_tiles["per_tile"]["image_mean_levels"]
    assert vae_tiles["whole_image"]["decoder_held_bytes_reckoned"] > 0
    assert "| VAE at 128 px (64/16 px tiles) |" in (tmp_path / "bench-tiny.md").read_text()
    fewer = report["tiling_throughput"]["fewer_tiles"]  # 2x2 tiles of 80 px instead of 3x3 of 64
    assert (fewer["tile_px"], fewer["tiles"]) == (80, 4) and fewer["flops_over_untiled"] > 0
    # each speed-up measured against the unchanged models, and none changes the result (fp32)
    speed = report["speedups"]
    assert set(speed) == {"baseline", "fuse_qkv", "channels_last_vae", "tile_batch", "tile_fit"}
    assert set(speed["fuse_qkv"]) == {"transformer_one_forward", "transformer_tiled"}
    assert set(speed["channels_last_vae"]) == {"vae_encode", "vae_decode"}
    assert speed["tile_batch"]["detail"] == "3 tiles per call"
    for name, entries in speed.items():
        for key, v in entries.items():
            if name not in ("baseline", "tile_fit") and key != "detail":  # tile_fit changes the grid
                assert v["output_rel_l2"] < 1e-4 and v["before_s"] == speed["baseline"][key]
    assert speed["tile_fit"]["detail"].endswith("px tiles instead of 64")
    md = (tmp_path / "bench-tiny.md").read_text()
    assert report["resident_weights"]["modes"]["fp8_storage"] < report["resident_weights"]["modes"]["none"]
    assert "overhead" in md and "| tile_batch (3 tiles per call) | transformer_tiled |" in md
    assert not list(tmp_path.glob("*.tmp"))


def test_flop_count_of_flux1_dev_at_1024():
    """Shapes-only FLOP count: FLUX.1-dev at 1024x1024 (4096 image + 512 text tokens) is ~74 TFLOP."""
    bench = load_bench("fluxsr_bench_run2")
    from types import SimpleNamespace
    cfg = SimpleNamespace(num_attention_heads=24, attention_head_dim=128, num_layers=19, num_single_layers=38,
                          in_channels=64, joint_attention_dim=4096)
    d, t = 3072, 4608
    blocks = 57 * (24 * t * d * d + 4 * t * t * d)
    assert bench.transformer_flops(cfg, 4096, 512) == pytest.approx(blocks, rel=0.01)
    assert 70e12 < bench.transformer_flops(cfg, 4096, 512) < 80e12


def test_random_model_is_made_in_place_with_the_layers_own_init():
    """The full-size bench builds FLUX.1-dev on the meta device and initialises it where it lives:
    every weight set (nothing left as to_empty's garbage), seeded, in the asked dtype."""
    import torch
    from diffusers import FluxTransformer2DModel

    from fluxsr_core.weights import shipped_config

    bench = load_bench("fluxsr_bench_run3")
    cfg = {k: v for k, v in shipped_config("tiny-transformer").items() if not k.startswith("_")}
    a = bench.random_model(FluxTransformer2DModel, cfg, torch.bfloat16, torch.device("cpu"), seed=5)
    b = bench.random_model(FluxTransformer2DModel, cfg, torch.bfloat16, torch.device("cpu"), seed=5)
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        assert p.dtype == torch.bfloat16 and not p.requires_grad and torch.isfinite(p).all(), name
        assert torch.equal(p, q), name
    lin = a.transformer_blocks[0].attn.to_q.weight.float()
    bound = 1 / lin.shape[1] ** 0.5  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound
    assert lin.abs().max() <= bound * 1.01 and lin.std() > bound / 3
    norm = a.transformer_blocks[0].attn.norm_q.weight
    assert torch.equal(norm, torch.ones_like(norm))
    c = bench.rebuild(a)  # a fresh module tree over the same tensors
    assert c is not a and all(p.data_ptr() == q.data_ptr() for p, q in zip(a.parameters(), c.parameters()))


def test_flux1_dev_weights_per_memory_mode_from_the_shapes():
    """FLUX.1-dev on the meta device: 11,901,408,320 transformer parameters; diffusers' fp8
    layerwise casting keeps the AdaLN modulation linears ("norm" in their names) and the
    embedders in bf16, so fp8_storage stores 14.3 GiB, not half of 22.2; fp8_storage_all 11.2."""
    import torch

    bench = load_bench("fluxsr_bench_run4")
    w = bench.resident_weights(bench.PROFILES["full"], torch.bfloat16)
    assert w["transformer_bytes"] == 2 * 11_901_408_320
    modes = w["modes"]
    assert modes["none"] == w["transformer_bytes"] + w["vae_bytes"] and modes["model_offload"] == w["transformer_bytes"]
    assert 0.6 < modes["fp8_storage"] / modes["none"] < 0.67
    assert 0.49 < modes["fp8_storage_all"] / modes["none"] < 0.51  # modulation in fp8 too: 11.2 GiB
    assert modes["group_offload"] < modes["none"] / 10


def test_cpu_peak_memory_is_the_peak_of_live_torch_allocations():
    """10 MiB, then 20 MiB more, free the 10, add 5: the peak is 30 MiB whatever the allocator
    kept from before (which is what made peak RSS growth read 48 MiB below a 60 MiB base)."""
    import torch

    bench = load_bench("fluxsr_bench_run5")
    mib = 2 ** 20
    warm = torch.empty(64 * mib // 4)  # freed before the block: glibc may keep it for reuse
    del warm
    with bench.PeakMemory(torch.device("cpu")) as pm:
        a = torch.empty(10 * mib // 4)
        b = torch.empty(20 * mib // 4)
        del a
        c = torch.empty(5 * mib // 4)
    assert pm.peak == 30 * mib and b.numel() and c.numel()


def test_a_failing_speedup_is_recorded_and_the_others_still_run(tmp_path):
    """One change that cannot run (cuDNN attention without a GPU) must not cost a GPU lease
    the rest of the report."""
    import torch

    if torch.cuda.is_available():  # pragma: no cover - CI has no GPU
        pytest.skip("cudnn_attention runs here")
    bench = load_bench("fluxsr_bench_run6")
    assert bench.main(["--tiny", "--out", str(tmp_path), "--teacher-steps", "2", "--memory-modes", "",
                       "--speedups", "cudnn_attention,tile_batch"]) == 0
    report = json.loads((tmp_path / "bench-tiny.json").read_text())
    assert "needs a CUDA GPU" in report["speedups"]["cudnn_attention"]["error"]
    assert report["speedups"]["tile_batch"]["transformer_tiled"]["after_s"] > 0
    assert "memory_modes" not in report and report["load_from_file"]["file_bytes"] > 0
    assert "| cudnn_attention | failed: ValueError: cudnn_attention needs a CUDA GPU" in \
        (tmp_path / "bench-tiny.md").read_text()


def test_a_failing_section_is_recorded_and_the_sections_after_it_still_run(tmp_path, monkeypatch):
    """Every stage of the report is guarded, not only the speed-ups: a memory mode that fails on
    the GPU (out of memory, a path only CUDA takes), the teacher, or the single-file load (a full
    disk) is recorded with its error and the rest of a one-shot GPU lease is still measured."""
    bench = load_bench("fluxsr_bench_guarded")
    real = bench.models.apply_memory_mode

    def apply(transformer, vae, mode, device):
        if mode == "group_offload":
            raise RuntimeError("CUDA out of memory. Tried to allocate 24.00 GiB\nmore lines")
        return real(transformer, vae, mode, device)

    def teacher(*args, **kwargs):
        raise ValueError("teacher broke")

    def load(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(bench.models, "apply_memory_mode", apply)
    monkeypatch.setattr(bench, "teacher_ratio", teacher)
    monkeypatch.setattr(bench, "load_from_file", load)
    assert bench.main(["--tiny", "--out", str(tmp_path), "--teacher-steps", "2",
                       "--memory-modes", "none,group_offload,model_offload", "--speedups", "tile_batch"]) == 0
    report = json.loads((tmp_path / "bench-tiny.json").read_text())
    errors = report["errors"]
    assert errors == {"teacher": "ValueError: teacher broke",
                      "memory_mode group_offload": "RuntimeError: CUDA out of memory. Tried to allocate 24.00 GiB",
                      "load_from_file": "OSError: [Errno 28] No space left on device"}
    assert "teacher" not in report and "load_from_file" not in report
    # what comes after each failure was measured
    assert report["transformer_efficiency"]["fraction_of_matmul"] > 0 and report["tiling_throughput"]["tiles"] == 9
    assert report["memory_modes"]["group_offload"] == {"error": errors["memory_mode group_offload"]}
    assert report["memory_modes"]["none"]["seconds"] > 0 and report["memory_modes"]["model_offload"]["seconds"] > 0
    assert report["speedups"]["tile_batch"]["transformer_tiled"]["after_s"] > 0
    md = (tmp_path / "bench-tiny.md").read_text()
    assert "| group_offload | failed: RuntimeError: CUDA out of memory" in md and "| model_offload | " in md
    assert "* load_from_file: OSError: [Errno 28] No space left on device" in md


def test_the_single_file_load_is_refused_up_front_on_a_disk_too_small(monkeypatch):
    """FLUX.1-dev's single file is 24 GB: a disk without room says so before writing any of it."""
    import shutil
    from types import SimpleNamespace

    import torch

    bench = load_bench("fluxsr_bench_disk")
    state = {"w": torch.zeros(1024, 1024)}
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(total=2**31, used=2**31, free=2**29))
    with pytest.raises(OSError, match=r"0.5 GiB free in .*; the single file needs 0.0 GiB"):
        bench.load_from_file([(None, None, state), None], torch.device("cpu"), torch.float32)


def test_default_tiles_cost_flux1_dev_more_work_at_2048_and_less_at_4096():
    """From the shapes: 1024/256 px tiles make 9 tiles at 2048 px (1.6x the untiled FLOPs: the
    overlaps repeat tokens) and 25 at 4096 px (0.48x: attention over the whole image is quadratic)."""
    from types import SimpleNamespace

    from fluxsr_core.tiling import TilingConfig

    bench = load_bench("fluxsr_bench_run7")
    cfg = SimpleNamespace(num_attention_heads=24, attention_head_dim=128, num_layers=19, num_single_layers=38,
                          in_channels=64, joint_attention_dim=4096)
    ratios = {}
    for side in (2048, 4096):
        lat = side // 8
        shapes = bench._tile_shapes(lat, lat, TilingConfig())
        ratios[side] = (len(shapes), sum(bench.transformer_flops(cfg, (h // 2) * (w // 2), 512) for h, w in shapes)
                        / bench.transformer_flops(cfg, (lat // 2) ** 2, 512))
    assert ratios[2048][0] == 9 and 1.55 < ratios[2048][1] < 1.65
    assert ratios[4096][0] == 25 and 0.45 < ratios[4096][1] < 0.51
    lat = 256  # fitted tiles at 2048 px: 9 tiles of 864 px, 1.14x the untiled FLOPs
    fitted = bench._tile_shapes(lat, lat, TilingConfig(fit_tiles=True))
    ratio = sum(bench.transformer_flops(cfg, (h // 2) * (w // 2), 512) for h, w in fitted) / \
        bench.transformer_flops(cfg, (lat // 2) ** 2, 512)
    assert len(fitted) == 9 and fitted[0] == (108, 108) and 1.1 < ratio < 1.2


def test_flops_counted_by_torch_on_meta_tensors_agree_with_the_hand_count():
    """FLUX.1-dev at 1024 px, counted by FlopCounterMode on meta tensors: the transformer's 74.4
    TFLOP match transformer_flops within 0.1%; the VAE adds 4.9 (encode) + 10.5 (decode) TFLOP,
    so even at the transformer's rate the whole upscale takes 1.21x the transformer alone."""
    import torch

    bench = load_bench("fluxsr_bench_run8")
    counted = bench.counted_flops(bench.PROFILES["full"], torch.bfloat16, 1024)
    from types import SimpleNamespace
    cfg = SimpleNamespace(num_attention_heads=24, attention_head_dim=128, num_layers=19, num_single_layers=38,
                          in_channels=64, joint_attention_dim=4096)
    assert counted["transformer"] == pytest.approx(bench.transformer_flops(cfg, 4096, 512), rel=1e-3)
    assert counted["vae_encode"] == pytest.approx(4.88e12, rel=0.01)
    assert counted["vae_decode"] == pytest.approx(10.47e12, rel=0.01)
    assert sum(counted.values()) / counted["transformer"] == pytest.approx(1.21, abs=0.01)


def test_activation_peaks_report(tmp_path):
    bench = load_bench("fluxsr_bench_run5")
    assert bench.main(["--tiny", "--activation-peaks", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "bench-tiny-activations.json").read_text())
    assert set(report["peaks_bytes"]) == {"transformer_tile", "vae_encode_tile", "vae_decode_tile",
                                          "upscale_2x_tile_side"}
    assert all(v > 0 for v in report["peaks_bytes"].values()) and report["tile_px"] == 64
    assert "| whole x4 upscale to 128 px, tiled |" in (tmp_path / "bench-tiny-activations.md").read_text()


def test_activation_peak_does_not_grow_with_depth():
    """--activation-peaks measures FLUX.1-dev's activations with one block of each kind. That is
    valid only because, without autograd, each block's activations are freed before the next
    runs: the peak of a forward is the same with 1+1 and 3+3 blocks."""
    import torch

    from fluxsr_core import flow, models

    bench = load_bench("fluxsr_bench_run6")
    peaks = []
    for depth in (1, 3):
        profile = dict(bench.PROFILES["small"],
                       transformer={**bench.SMALL_TRANSFORMER, "num_layers": depth, "num_single_layers": depth})
        transformer, _ = bench.build(profile, torch.device("cpu"), torch.float32)
        velocity = models.DiffusersVelocity(transformer, compute_dtype=torch.float32)
        cond = bench.conditioning(transformer, 64, "cpu", torch.float32)
        latent = torch.randn(1, 16, 32, 32, generator=torch.Generator().manual_seed(0))
        with torch.inference_mode():
            flow.one_step_sr(velocity, latent, 0.25, cond)
            with bench.PeakMemory(torch.device("cpu")) as pm:
                flow.one_step_sr(velocity, latent, 0.25, cond)
        peaks.append(pm.peak)
    assert peaks[0] > 0 and peaks[0] == peaks[1]


def test_compile_under_fp8_is_measured_against_fp8_uncompiled(monkeypatch):
    """compile_fp8: compile where 16-24 GB cards run (fp8_storage_all), before and after on the
    same fp8 model, so the figure is compile's and not fp8's (eager backend: no inductor wait).
    Each compile variant starts from empty dynamo caches (else the next one reuses, or runs out
    of recompiles and stays eager: seen on the CPU as compile at 0.91x with no change at all)."""
    import torch

    resets = []
    real_reset = torch.compiler.reset
    monkeypatch.setattr(torch.compiler, "reset", lambda: (resets.append(1), real_reset()))

    from fluxsr_core.tiling import TilingConfig

    bench = load_bench("fluxsr_bench_run7")
    profile = bench.PROFILES["tiny"]
    transformer, vae = bench.build(profile, torch.device("cpu"), torch.float32)
    cond = bench.conditioning(transformer, profile["text"], "cpu", torch.float32)
    tiles = TilingConfig(latent_tile=profile["tile"], latent_overlap=profile["overlap"])
    report, saved = {}, []
    with torch.inference_mode():  # results land in `report` as they come, each followed by a save
        bench.speedup_variants(transformer, vae, cond, profile, tiles, torch.float32, ["compile_fp8", "cudnn_attention"], 1,
                               compile_backend="eager", report=report, after_each=lambda: saved.append(set(report)))
    assert saved == [{"baseline"}, {"baseline", "compile_fp8"}, {"baseline", "compile_fp8", "cudnn_attention"}]
    assert len(resets) == 1
    if not torch.cuda.is_available():  # a variant that fails is recorded, and saved, too
        assert "needs a CUDA GPU" in report.pop("cudnn_attention")["error"]
    entry = report["compile_fp8"]
    assert entry.pop("detail") == "fp8_storage_all, against it uncompiled"
    assert set(entry) == {"transformer_one_forward", "transformer_tiled"}
    for key, v in entry.items():
        assert v["before_s"] != report["baseline"][key] and v["output_rel_l2"] < 1e-6
    assert all(p.dtype == torch.float32 for p in transformer.parameters())  # the unchanged model stays so


def test_fewer_tiles_is_the_shortest_tile_one_fewer_per_axis():
    """FLUX.1-dev at 2048 px (256 latent, default 128/32 latent tiles: 3 per axis) -> 144 latent
    (1152 px), 2 per axis; at 4096 px (5 per axis) -> 152 (1216 px), 4 per axis; one tile -> None."""
    from fluxsr_core import tiling
    from fluxsr_core.tiling import TilingConfig

    bench = load_bench("fluxsr_bench_run8")
    base = TilingConfig(latent_tile=128, latent_overlap=32)
    for length, tile, per_axis in ((256, 144, 2), (512, 152, 4)):
        fewer = bench.fewer_tiles(length, base)
        assert fewer.latent_tile == tile and len(tiling.axis_tiles(length, fewer)[1]) == per_axis
        assert len(tiling.axis_tiles(length, fewer.__class__(latent_tile=tile - 2, latent_overlap=32))[1]) > per_axis
    assert bench.fewer_tiles(128, base) is None


def test_token_grid_error_measures_the_part_of_the_error_that_repeats_every_token():
    spec = importlib.util.spec_from_file_location("fluxsr_bench_adl", BENCH.with_name("adl_forms_demo.py"))
    adl = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adl)
    import numpy as np

    rng = np.random.default_rng(0)
    ref = rng.integers(40, 200, size=(160, 224, 3)).astype(np.uint8)
    # a grey +-4 level checker of one token's period (16 px): a grid artefact
    yy, xx = np.mgrid[:160, :224]
    grid = np.where(((yy % 16) < 8) ^ ((xx % 16) < 8), 4, -4)[..., None]
    gridded = (ref.astype(int) + grid).astype(np.uint8)
    # Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255 per level of grey: 219/255 of it
    assert adl.token_grid_error(gridded, ref) == pytest.approx(4 * 219 / 255, rel=0.02)
    noisy = np.clip(ref.astype(int) + rng.integers(-4, 5, size=ref.shape), 0, 255).astype(np.uint8)
    assert adl.token_grid_error(noisy, ref) < 0.3              # independent noise averages out
    brighter = (ref.astype(int) + 4).astype(np.uint8)
    assert adl.token_grid_error(brighter, ref) == pytest.approx(0.0, abs=1e-9)   # an offset is no grid
    assert adl.token_grid_error(gridded[:150, :200], ref) > 3  # sizes that are no multiple of 16


def test_the_benchs_q8_0_quantiser_is_gguf_q8_0():
    """bench's gguf_q8_0 mode quantises random weights itself (a 12B file would take minutes to
    write): its blocks read back, through diffusers' dequantiser, as gguf-py reads its own."""
    gguf = pytest.importorskip("gguf")
    import numpy as np
    import torch
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    bench = load_bench("fluxsr_bench_q8")
    weight = torch.randn(48, 96, generator=torch.Generator().manual_seed(0)) * 0.02
    weight[3, :32] = 0  # an all-zero block: scale 0, no division by it
    ours = bench.quantize_q8_0(weight)
    assert ours.shape == (48, 96 // 32 * 34) and ours.quant_type == gguf.GGMLQuantizationType.Q8_0
    theirs = gguf.quants.quantize(weight.numpy(), gguf.GGMLQuantizationType.Q8_0)
    ours_read = dequantize_gguf_tensor(ours).float()
    theirs_read = torch.from_numpy(np.ascontiguousarray(
        gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType.Q8_0)).reshape(48, 96))
    scale = weight.abs().reshape(-1, 32).amax(dim=1).max() / 127
    assert float((ours_read - theirs_read).abs().max()) <= float(scale) * 1.01  # a rounding tie at most one step apart
    assert float((ours_read - weight).abs().max()) <= float(scale) * 0.51  # within half a step of the input
    assert torch.all(ours_read[3, :32] == 0)


def test_compile_cudagraphs_is_skipped_with_its_reason_where_torch_cannot_clone_the_graphs_outputs(monkeypatch):
    """On torch < 2.14 (the lent GPU's 2.11) FLUX's block loop fails under CUDA graphs after
    compiling and recording (pytorch#152887): a lease's minute for an error. Skipped, saying why,
    and the variants after it still run."""
    import torch

    from fluxsr_core import models
    from fluxsr_core.tiling import TilingConfig

    bench = load_bench("fluxsr_bench_run8")
    monkeypatch.setattr(models, "cudagraph_output_cloning_available", lambda: False)
    profile = bench.PROFILES["tiny"]
    transformer, vae = bench.build(profile, torch.device("cpu"), torch.float32)
    cond = bench.conditioning(transformer, profile["text"], "cpu", torch.float32)
    tiles = TilingConfig(latent_tile=profile["tile"], latent_overlap=profile["overlap"])
    with torch.inference_mode():
        report = bench.speedup_variants(transformer, vae, cond, profile, tiles, torch.float32,
                                        ["compile_cudagraphs", "tile_fit"], 1)
    assert report["compile_cudagraphs"] == {"error": "skipped: needs torch 2.14 or newer (cudagraph output cloning, "
                                                     f"pytorch/pytorch#152887); this torch is {torch.__version__}"}
    assert "transformer_tiled" in report["tile_fit"]
