"""Smoke check of the benchmark's --tiny mode: the whole path runs and the report is complete.
Nothing about time is asserted (timing belongs to bench/, not to tests)."""

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "run.py"


def test_tiny_benchmark_writes_a_complete_report(tmp_path):
    spec = importlib.util.spec_from_file_location("fluxsr_bench_run", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--tiny", "--out", str(tmp_path), "--teacher-steps", "3"]) == 0
    report = json.loads((tmp_path / "bench-tiny.json").read_text())
    assert set(report["upscale"][0]["parts_s"]) == {"resize_pad", "vae_encode", "transformer_tiled",
                                                    "vae_decode", "color_fix"}
    assert report["teacher"]["steps"] == 3 and report["memory"]["method"]
    # --tiny keeps the whole full-size path running: two sizes, efficiency, every memory mode
    assert len(report["upscale"]) == 2 and report["transformer_efficiency"]["flops"] > 0
    assert set(report["memory_modes"]) == {"none", "fp8_storage", "model_offload", "group_offload"}
    assert "overhead" in (tmp_path / "bench-tiny.md").read_text()


def test_flop_count_of_flux1_dev_at_1024():
    """Shapes-only FLOP count: FLUX.1-dev at 1024x1024 (4096 image + 512 text tokens) is ~74 TFLOP."""
    spec = importlib.util.spec_from_file_location("fluxsr_bench_run2", BENCH)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    from types import SimpleNamespace
    cfg = SimpleNamespace(num_attention_heads=24, attention_head_dim=128, num_layers=19, num_single_layers=38,
                          in_channels=64, joint_attention_dim=4096)
    d, t = 3072, 4608
    blocks = 57 * (24 * t * d * d + 4 * t * t * d)
    assert bench.transformer_flops(cfg, 4096, 512) == pytest.approx(blocks, rel=0.01)
    assert 70e12 < bench.transformer_flops(cfg, 4096, 512) < 80e12
