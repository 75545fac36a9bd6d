"""Evaluation: PSNR-Y/SSIM-Y against hand numbers, scikit-image and BasicSR's algorithm; border
cut; bicubic baseline; skipped metrics listed with reasons; the real-weights loading path of LPIPS
exercised with a locally written random-weight file; pyiqa wiring without downloads."""

from __future__ import annotations

import json
import math
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxsr_training import evaluate as E


def _photo(h=96, w=128, seed=0) -> np.ndarray:
    """A smooth colour image with some texture (deterministic)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    base = np.stack([np.sin(xx / 9.0), np.cos(yy / 7.0), np.sin((xx + yy) / 13.0)], -1) * 0.35 + 0.5
    base += rng.normal(0, 0.04, base.shape)
    return np.clip(np.round(base * 255), 0, 255).astype(np.uint8)


def _noisy(a: np.ndarray, amp=12, seed=1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(a.astype(int) + rng.integers(-amp, amp + 1, a.shape), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------- Y channel, PSNR

def test_y_channel_hand_numbers():
    white = np.full((4, 4, 3), 255, np.uint8)
    black = np.zeros((4, 4, 3), np.uint8)
    red = np.zeros((4, 4, 3), np.uint8)
    red[..., 0] = 255
    assert np.allclose(E.rgb_to_y(white), 235.0)         # 16 + 65.481 + 128.553 + 24.966
    assert np.allclose(E.rgb_to_y(black), 16.0)
    assert np.allclose(E.rgb_to_y(red), 16.0 + 65.481)
    # PSNR of white vs black: Y differs by 219 everywhere -> 20 log10(255 / 219)
    assert E.psnr_y(white, black) == pytest.approx(20 * math.log10(255 / 219), abs=1e-9)
    assert E.psnr_y(white, white) == float("inf")


def test_psnr_hand_number_single_pixel_error():
    a = np.full((10, 10, 3), 100, np.uint8)
    b = a.copy()
    b[0, 0] = (110, 100, 100)           # one pixel, R + 10 -> Y + 10 * 65.481 / 255
    dy = 10 * 65.481 / 255
    mse = dy * dy / 100
    assert E.psnr_y(b, a) == pytest.approx(10 * math.log10(255 ** 2 / mse), abs=1e-9)
    # the border cut removes the only differing pixel
    assert E.psnr_y(b, a, crop_border=1) == float("inf")


def test_float_tensor_inputs_are_rounded_to_8_bits():
    a = _photo()
    t = torch.from_numpy(a).permute(2, 0, 1).float() / 255
    assert np.array_equal(E.to_uint8_hwc(t), a)
    assert np.array_equal(E.to_uint8_hwc(t[None] + 0.4 / 255), a)   # rounding, as saving a PNG
    gray = a[..., 0]
    assert np.array_equal(E.to_uint8_hwc(gray), np.repeat(gray[..., None], 3, 2))
    with pytest.raises(ValueError, match="NaN"):
        E.to_uint8_hwc(np.full((4, 4, 3), np.nan))


def test_uint8_tensors_are_8_bit_and_images_on_0_255_as_floats_are_refused():
    """A uint8 CHW tensor (torchvision.io.read_image's) scored as 8-bit; it was read as [0, 1]
    and clipped to white (PSNR-Y 47.6 for 29.8). A float image on [0, 255] is refused likewise."""
    a, b = _photo(), _noisy(_photo(), 12)
    as_tensor = lambda x: torch.from_numpy(x).permute(2, 0, 1).contiguous()  # noqa: E731
    assert np.array_equal(E.to_uint8_hwc(as_tensor(a)), a)
    assert E.psnr_y(as_tensor(b), as_tensor(a), 4) == E.psnr_y(b, a, 4) < 40
    assert E.ssim_y(as_tensor(b)[None], as_tensor(a)[None], 4) == E.ssim_y(b, a, 4)
    with pytest.raises(ValueError, match=r"a float image must lie in \[0, 1\], this one reaches 2\d\d: divide"):
        E.psnr_y(b.astype(np.float64), a.astype(np.float64))
    # a model's small overshoot is clipped, as before
    assert np.array_equal(E.to_uint8_hwc(np.full((2, 2, 3), 1.2)), np.full((2, 2, 3), 255, np.uint8))


def test_psnr_and_ssim_match_scikit_image_on_the_y_channel():
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    ref = _photo()
    out = _noisy(ref)
    b = 4
    ya, yb = E.rgb_to_y(out[b:-b, b:-b]), E.rgb_to_y(ref[b:-b, b:-b])
    want_psnr = peak_signal_noise_ratio(yb, ya, data_range=255)
    want_ssim = structural_similarity(yb, ya, data_range=255, gaussian_weights=True, sigma=1.5,
                                      use_sample_covariance=False)
    assert E.psnr_y(out, ref, crop_border=b) == pytest.approx(want_psnr, abs=1e-9)
    assert E.ssim_y(out, ref, crop_border=b) == pytest.approx(want_ssim, abs=1e-9)
    assert 0.3 < want_ssim < 0.99      # a case that tells right from wrong


def _basicsr_ssim(img: np.ndarray, img2: np.ndarray) -> float:
    """BasicSR's _ssim, transcribed with scipy in place of cv2.filter2D (same correlation)."""
    from scipy.ndimage import correlate

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    k = np.exp(-((np.arange(11) - 5) ** 2) / (2 * 1.5 ** 2))
    k /= k.sum()
    window = np.outer(k, k)
    f = lambda x: correlate(x, window, mode="reflect")[5:-5, 5:-5]  # noqa: E731
    mu1, mu2 = f(img), f(img2)
    s1, s2, s12 = f(img ** 2) - mu1 ** 2, f(img2 ** 2) - mu2 ** 2, f(img * img2) - mu1 * mu2
    m = ((2 * mu1 * mu2 + c1) * (2 * s12 + c2)) / ((mu1 ** 2 + mu2 ** 2 + c1) * (s1 + s2 + c2))
    return float(m.mean())


def test_ssim_matches_basicsr_algorithm_and_border_matters():
    ref = _photo(64, 80, seed=3)
    out = _noisy(ref, amp=30, seed=4)
    out[:4] = 0                          # damage only the border rows
    for b in (0, 4):
        ya = E.rgb_to_y(out[b:out.shape[0] - b, b:out.shape[1] - b])
        yb = E.rgb_to_y(ref[b:ref.shape[0] - b, b:ref.shape[1] - b])
        assert E.ssim_y(out, ref, crop_border=b) == pytest.approx(_basicsr_ssim(ya, yb), abs=1e-10)
    assert E.psnr_y(out, ref, 4) > E.psnr_y(out, ref, 0) + 3


def test_size_mismatch_and_tiny_images_are_clear_errors():
    with pytest.raises(E.EvaluationError, match="differ in size"):
        E.psnr_y(_photo(32, 32), _photo(32, 40))
    with pytest.raises(E.EvaluationError, match="nothing left"):
        E.psnr_y(_photo(8, 8), _photo(8, 8), crop_border=4)
    with pytest.raises(E.EvaluationError, match="at least 11x11"):
        E.ssim_y(_photo(16, 16), _photo(16, 16), crop_border=4)
    # in a set, the error names the image (and the method) it is about
    refs = {"big.png": _photo(64, 64), "tiny.png": _photo(16, 16)}
    with pytest.raises(E.EvaluationError, match=r"^ours, image tiny.png: SSIM needs images of at least 11x11"):
        E.evaluate_images({"ours": dict(refs)}, refs, scale=4, metrics=["psnr_y", "ssim_y"], bicubic=False)


# --------------------------------------------------------------------------- bicubic

def _pillow_bicubic_symmetric(img: np.ndarray, size: tuple[int, int], pad: int, factor: float) -> np.ndarray:
    """Pillow's bicubic (a = -0.5, antialiased when shrinking) of the image mirrored at its
    borders: an independent reference for MATLAB's imresize, whose borders are symmetric."""
    padded = np.pad(img, pad, mode="symmetric")
    grow = int(pad * factor)
    out = Image.fromarray(padded.astype(np.float32), "F").resize((size[1] + 2 * grow, size[0] + 2 * grow),
                                                                 Image.BICUBIC)
    return np.asarray(out, dtype=np.float64)[grow:-grow, grow:-grow]


@pytest.mark.parametrize("size, pad, factor", [((16, 20), 16, 0.25), ((256, 320), 8, 4.0), ((32, 40), 8, 0.5)])
def test_matlab_imresize_is_pillows_bicubic_with_symmetric_borders(size, pad, factor):
    img = _photo(64, 80, 3)[..., 0].astype(np.float64)
    got = E.matlab_imresize(img[..., None], size)[..., 0]
    assert got.shape == size
    np.testing.assert_allclose(got, _pillow_bicubic_symmetric(img, size, pad, factor), rtol=0, atol=2e-4)
    # and not torch's kernel (a = -0.75): the baselines differ measurably
    torch_up = E.bicubic_upscale(_photo(16, 20, 3), 4, kernel="torch").astype(int)
    assert np.abs(torch_up - E.bicubic_upscale(_photo(16, 20, 3), 4)).max() > 0
    with pytest.raises(ValueError, match="bicubic kernel 'lanczos'"):
        E.bicubic_upscale(_photo(16, 20, 3), 4, kernel="lanczos")


# --------------------------------------------------------------------------- report

def test_evaluate_images_bicubic_row_skips_and_tables(tmp_path):
    refs = {"a": _photo(66, 83, 0), "b": _photo(64, 96, 5)}          # "a" is not a multiple of 4
    exact = {k: E.mod_crop(v, 4) for k, v in refs.items()}
    report = E.evaluate_images({"perfect": exact, "noisy": {k: _noisy(v) for k, v in exact.items()}},
                               refs, scale=4, metrics="psnr_y,ssim_y,dists,musiq",
                               weights_dir=tmp_path / "empty")
    assert [r.name for r in report.rows] == ["bicubic", "perfect", "noisy"]
    assert report.metrics == ["psnr_y", "ssim_y"]
    assert set(report.skipped) == {"dists", "musiq"} and all(report.skipped.values())
    assert report.row("perfect").mean["psnr_y"] == float("inf")
    assert report.row("perfect").mean["ssim_y"] == pytest.approx(1.0)
    # the bicubic row is exactly: bicubic downscale of the mod-cropped reference, then upscale
    want = np.mean([E.psnr_y(E.bicubic_upscale(E.bicubic_downscale(refs[k], 4), 4), exact[k], 4)
                    for k in refs])
    assert report.row("bicubic").mean["psnr_y"] == pytest.approx(want, abs=1e-9)
    assert 25 < report.row("noisy").mean["psnr_y"] < 40          # +-12 uniform noise: about 30 dB
    md = report.to_markdown(per_image=True)
    assert "| bicubic |" in md and "PSNR-Y ↑" in md and "Skipped" in md and "DISTS" in md
    data = json.loads(report.to_json())
    assert data["rows"][1]["mean"]["psnr_y"] == "inf"
    assert data["skipped"]["dists"] == report.skipped["dists"]


def test_evaluate_images_rejects_wrong_sizes():
    refs = {"a": _photo(64, 64)}
    with pytest.raises(E.EvaluationError, match="reference's size"):
        E.evaluate_images({"m": {"a": _photo(60, 64)}}, refs, 4, metrics="psnr_y")
    with pytest.raises(E.EvaluationError, match="no output"):
        E.evaluate_images({"m": {}}, refs, 4, metrics="psnr_y")
    with pytest.raises(E.EvaluationError, match="needs 16x16"):
        E.evaluate_images({"m": refs}, refs, 4, lr_images={"a": _photo(8, 8)}, metrics="psnr_y")
    with pytest.raises(ValueError, match="unknown metric"):
        E.parse_metrics("psnr,ssim")


def test_folders_cli_and_lr_dir(tmp_path):
    ref_dir, out_dir, lr_dir = tmp_path / "hr", tmp_path / "sr", tmp_path / "lr"
    for d in (ref_dir, out_dir, lr_dir):
        d.mkdir()
    refs = {"x": _photo(64, 80, 1), "y": _photo(48, 64, 2)}
    for k, v in refs.items():
        Image.fromarray(v).save(ref_dir / f"{k}.png")
        Image.fromarray(_noisy(v, 6)).save(out_dir / f"{k}.png")
        Image.fromarray(v[::4, ::4]).save(lr_dir / f"{k}.png")        # a different LR than bicubic's
    rep = E.evaluate_folders(out_dir, ref_dir, scale=4, metrics="psnr_y,ssim_y")
    rep_lr = E.evaluate_folders({"mine": out_dir}, ref_dir, scale=4, lr_dir=lr_dir, metrics="psnr_y")
    assert rep.row("sr").mean["psnr_y"] == rep_lr.row("mine").mean["psnr_y"]
    assert rep.row("bicubic").mean["psnr_y"] != rep_lr.row("bicubic").mean["psnr_y"]
    assert "given LR images" in rep_lr.baseline and "MATLAB's imresize" in rep_lr.baseline
    torch_rep = E.evaluate_folders(out_dir, ref_dir, scale=4, metrics="psnr_y", bicubic_kernel="torch")
    assert torch_rep.row("bicubic").mean["psnr_y"] != rep.row("bicubic").mean["psnr_y"]
    assert "torch's bicubic" in torch_rep.baseline

    js, md = tmp_path / "r.json", tmp_path / "r.md"
    code = E.main_eval([str(out_dir), "-r", str(ref_dir), "--metrics", "psnr_y,ssim_y,topiq_nr",
                        "--json", str(js), "--markdown", str(md), "--weights-dir", str(tmp_path / "w")])
    assert code == 0
    data = json.loads(js.read_text())
    assert data["rows"][1]["mean"]["psnr_y"] == pytest.approx(rep.row("sr").mean["psnr_y"])
    assert "topiq_nr" in data["skipped"]
    assert "| sr |" in md.read_text()
    (out_dir / "y.png").unlink()
    assert E.main_eval([str(out_dir), "-r", str(ref_dir), "--metrics", "psnr_y"]) == 2


def test_eval_output_files_that_cannot_be_written(tmp_path, capsys, monkeypatch):
    """A folder given as --json is refused before any metric runs; a write that fails after the
    metrics leaves the printed table, with the reason."""
    ref_dir, out_dir = tmp_path / "hr", tmp_path / "sr"
    for d in (ref_dir, out_dir):
        d.mkdir()
    Image.fromarray(_photo(48, 64, 2)).save(ref_dir / "y.png")
    Image.fromarray(_noisy(_photo(48, 64, 2), 6)).save(out_dir / "y.png")
    args = [str(out_dir), "-r", str(ref_dir), "--metrics", "psnr_y"]
    computed = []
    real = E.evaluate_folders
    monkeypatch.setattr(E, "evaluate_folders", lambda *a, **k: computed.append(1) or real(*a, **k))
    assert E.main_eval(args + ["--json", str(tmp_path)]) == 2
    assert f"--json {tmp_path} is a folder" in capsys.readouterr().err and not computed
    (tmp_path / "unmounted").symlink_to(tmp_path / "no-such-drive")  # a link to a drive not mounted
    assert E.main_eval(args + ["--json", str(tmp_path / "unmounted" / "r.json")]) == 2
    err = capsys.readouterr().err
    assert f"--json {tmp_path / 'unmounted' / 'r.json'}: " in err and "no-such-drive" in err and not computed
    assert "permission" not in err

    def no_space(path, text):
        raise OSError(28, "No space left on device", str(path))

    monkeypatch.setattr(E, "atomic_write_text", no_space)
    assert E.main_eval(args + ["--markdown", str(tmp_path / "r.md")]) == 2
    out, err = capsys.readouterr()
    assert "| sr |" in out and computed
    assert f"the table above is complete, but a file was not written: No space left on device: {tmp_path / 'r.md'}" in err


# --------------------------------------------------------------------------- perceptual metrics

def test_stlpips_runs_offline_and_is_labelled():
    pytest.importorskip("stlpips_pytorch")
    ref = _photo(64, 64)
    refs = {"a": ref}
    rep = E.evaluate_images({"same": refs, "noisy": {"a": _noisy(ref, 40)}}, refs, 4,
                            metrics="stlpips", bicubic=False)
    assert "stlpips-pytorch package weights" in rep.labels["stlpips"]
    assert rep.row("same").mean["stlpips"] == pytest.approx(0.0, abs=1e-6)
    assert rep.row("noisy").mean["stlpips"] > 0.01


def test_a_broken_stlpips_install_is_named_without_the_training_keys(monkeypatch):
    """The message eval shows for ST-LPIPS weights missing from their package named the trainer's
    loss.perceptual_path, which eval does not have: it says to reinstall, and nothing else."""
    pytest.importorskip("stlpips_pytorch")
    from fluxsr_training import perceptual

    monkeypatch.setattr(perceptual, "stlpips_weights_path", lambda net: Path("/nonexistent/stlpips") / f"{net}.pth")
    rep = E.evaluate_images({"m": {"a": _photo(64, 64)}}, {"a": _photo(64, 64)}, 4, metrics="psnr_y,stlpips",
                            bicubic=False)
    why = rep.skipped["stlpips"]
    assert "weights not found at /nonexistent/stlpips/alex.pth" in why and "pip install --force-reinstall" in why
    assert "loss." not in why and "give a copy" not in why


def test_lpips_reads_a_local_backbone_file(tmp_path, monkeypatch):
    """The code that loads real LPIPS weights, exercised with a random-weight AlexNet file (taken
    for the published one in the SHA-256 check; as it is, it is skipped as not published)."""
    import hashlib

    from fluxsr_training import perceptual as PC
    import torchvision

    missing = E.evaluate_images({"m": {"a": _photo(64, 64)}}, {"a": _photo(64, 64)}, 4, metrics="psnr_y,lpips",
                                bicubic=False, weights_dir=tmp_path)
    assert "alexnet-owt-7be5be79.pth" in missing.skipped["lpips"] and missing.metrics == ["psnr_y"]
    # nothing asked for can run: an error, not a table of nothing with exit 0
    with pytest.raises(E.EvaluationError, match="none of the metrics asked for can run here: LPIPS.*alexnet-owt"):
        E.evaluate_images({"m": {"a": _photo(64, 64)}}, {"a": _photo(64, 64)}, 4, metrics="lpips",
                          bicubic=False, weights_dir=tmp_path)

    torch.manual_seed(0)
    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    torch.save(torchvision.models.alexnet().state_dict(), ckpt / "alexnet-owt-7be5be79.pth")
    ref = _photo(64, 64)
    unpublished = E.evaluate_images({"m": {"a": ref}}, {"a": ref}, 4, metrics="psnr_y,lpips", bicubic=False,
                                    weights_dir=tmp_path)
    assert "is not torchvision's published AlexNet checkpoint" in unpublished.skipped["lpips"]
    monkeypatch.setitem(PC.TORCHVISION_BACKBONE_SHA256, "alex",
                        hashlib.sha256((ckpt / "alexnet-owt-7be5be79.pth").read_bytes()).hexdigest()[:8])
    rep = E.evaluate_images({"same": {"a": ref}, "noisy": {"a": _noisy(ref, 40)}}, {"a": ref}, 4,
                            metrics="lpips", bicubic=False, weights_dir=tmp_path)
    assert rep.skipped == {}
    assert str(ckpt / "alexnet-owt-7be5be79.pth") in rep.labels["lpips"]
    assert rep.row("same").mean["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert rep.row("noisy").mean["lpips"] > 0

    (ckpt / "alexnet-owt-7be5be79.pth").write_bytes(b"not a checkpoint")
    monkeypatch.setitem(PC.TORCHVISION_BACKBONE_SHA256, "alex", hashlib.sha256(b"not a checkpoint").hexdigest()[:8])
    bad = E.evaluate_images({"m": {"a": ref}}, {"a": ref}, 4, metrics="psnr_y,lpips", bicubic=False,
                            weights_dir=tmp_path)
    assert "cannot be read" in bad.skipped["lpips"]


@pytest.fixture
def fake_pyiqa(monkeypatch):
    """A stand-in pyiqa package (pyiqa itself is not installed in CI) recording create_metric calls.

    Its metric reads the file pyiqa would read from its cache folder, through the same module
    global the real pyiqa uses, and 'downloads' through download_url_to_file when it is absent
    or, like CLIP's loader, when its content is not the published file (a checksum check).
    """
    calls = []
    pkg = types.ModuleType("pyiqa")
    pkg.__version__ = "0.0-test"
    pkg.__path__ = []
    utils = types.ModuleType("pyiqa.utils")
    utils.__path__ = []
    dl = types.ModuleType("pyiqa.utils.download_util")
    dl.DEFAULT_CACHE_DIR = "/nonexistent"

    def download_url_to_file(url, dst, *a, **k):  # pragma: no cover - must never run
        raise AssertionError("a download was attempted")

    dl.download_url_to_file = download_url_to_file
    dl.download_file_from_google_drive = download_url_to_file

    def create_metric(name, as_loss=False, device=None, **kw):
        fname = {"musiq": "musiq_koniq_ckpt-e95806b9.pth"}.get(name, "other.pth")
        path = Path(dl.DEFAULT_CACHE_DIR) / fname
        if not path.is_file() or path.read_bytes() == b"not the published file":
            dl.download_url_to_file(f"https://example.invalid/{fname}", str(path))
        w = torch.load(path, weights_only=True)["w"]
        calls.append((name, str(path), torch.hub.get_dir()))
        return lambda x, *rest: (x.mean() * w).reshape(1)

    pkg.create_metric = create_metric
    monkeypatch.setitem(sys.modules, "pyiqa", pkg)
    monkeypatch.setitem(sys.modules, "pyiqa.utils", utils)
    monkeypatch.setitem(sys.modules, "pyiqa.utils.download_util", dl)
    monkeypatch.setattr(E, "_pyiqa_available", lambda: True)
    return calls, dl


def test_pyiqa_metric_built_from_local_file_without_downloads(tmp_path, fake_pyiqa):
    calls, dl = fake_pyiqa
    (tmp_path / "pyiqa").mkdir()
    torch.save({"w": torch.tensor(2.0)}, tmp_path / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth")
    img = _photo(32, 32)
    hub_before = torch.hub.get_dir()
    rep = E.evaluate_images({"m": {"a": img}}, {"a": img}, 4, metrics="musiq,dists", bicubic=False,
                            weights_dir=tmp_path)
    assert calls == [("musiq", str(tmp_path / "pyiqa" / "musiq_koniq_ckpt-e95806b9.pth"), str(tmp_path))]
    want = 2.0 * float(E._as_float_tensor(img).mean())
    assert rep.row("m").mean["musiq"] == pytest.approx(want, rel=1e-6)
    assert "local weights" in rep.labels["musiq"]
    assert "vgg16-397923af.pth" in rep.skipped["dists"]                  # checked before building
    assert dl.DEFAULT_CACHE_DIR == "/nonexistent" and torch.hub.get_dir() == hub_before  # restored


def test_pyiqa_download_attempt_is_refused_and_reported(tmp_path, fake_pyiqa, monkeypatch):
    calls, dl = fake_pyiqa
    # Our file table says musiq needs only its checkpoint; pretend a newer pyiqa wants another file.
    spec = E.METRIC_SPECS["musiq"]
    monkeypatch.setitem(E.METRIC_SPECS, "musiq", E.MetricSpec(spec.name, spec.title, spec.mode,
                                                              spec.lower_better, "pyiqa", (), "other"))
    img = _photo(32, 32)
    rep = E.evaluate_images({"m": {"a": img}}, {"a": img}, 4, metrics="psnr_y,musiq", bicubic=False,
                            weights_dir=tmp_path)
    assert "wanted to download https://example.invalid/other.pth" in rep.skipped["musiq"]
    assert calls == []
    # the file is there but pyiqa rejected it (a bad checksum) and tries again: said so
    (tmp_path / "pyiqa").mkdir(exist_ok=True)
    (tmp_path / "pyiqa" / "other.pth").write_bytes(b"not the published file")
    rep = E.evaluate_images({"m": {"a": img}}, {"a": img}, 4, metrics="psnr_y,musiq", bicubic=False,
                            weights_dir=tmp_path)
    assert "other.pth is there but was rejected (its checksum does not match" in rep.skipped["musiq"]


def test_what_changes_the_pixels_scored_is_logged(tmp_path, caplog):
    """An animated output is scored on its first frame: the scores say so in the log (the
    loader's note), not silently."""
    frames = [Image.new("RGB", (8, 8), (c, c, c)) for c in (10, 200)]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    caplog.set_level("WARNING", logger="fluxsr.eval")
    assert E.read_image_8bit(tmp_path / "anim.gif").shape == (8, 8, 3)
    assert "anim.gif is an animation with 2 frames; only the first was used" in caplog.text


def test_folder_pairing_is_said_where_it_surprises(tmp_path):
    """Outputs without a reference are noted (they were ignored without a word), names that
    differ only in case are pointed out, DIV2K's LR names (0801x4.png for 0801.png) pair, and a
    row whose PSNR-Y mean is inf (an image identical to its reference) gets the mean of the rest."""
    hr, sr, lr, bad = (tmp_path / d for d in ("hr", "sr", "lr", "bad"))
    for d in (hr, sr, lr, bad):
        d.mkdir()
    for i, name in enumerate(("0801", "0802")):
        ref = _photo(48, 64, i)
        Image.fromarray(ref).save(hr / f"{name}.png")
        Image.fromarray(ref if name == "0801" else _noisy(ref, 6)).save(sr / f"{name}.png")
        Image.fromarray(ref[::4, ::4]).save(lr / f"{name}x4.png")
    Image.fromarray(_photo(48, 64, 5)).save(sr / "extra.png")
    rep = E.evaluate_folders(sr, hr, 4, lr_dir=lr, metrics="psnr_y")
    notes = " ".join(rep.notes)
    assert "1 image(s) of" in notes and "have no reference" in notes and "'extra'" in notes
    assert rep.row("sr").mean["psnr_y"] == float("inf")
    finite = rep.row("sr").per_image["0802"]["psnr_y"]
    assert "sr: 1 of 2 images are identical to their reference (PSNR-Y inf" in notes
    assert f"the mean of the other 1 is {finite:.2f} dB" in notes
    # outputs of DIV2K's LR files keep the LR's name (fluxsr upscale lr/ -o out/ writes 0801x4.png)
    div2k_named = tmp_path / "div2k-named"
    div2k_named.mkdir()
    for name in ("0801", "0802"):
        (div2k_named / f"{name}x4.png").write_bytes((sr / f"{name}.png").read_bytes())
    same = E.evaluate_folders(div2k_named, hr, 4, lr_dir=lr, metrics="psnr_y")
    assert same.row("div2k-named").per_image == rep.row("sr").per_image and not any(
        "no reference" in n for n in same.notes)
    (div2k_named / "0802x4.png").unlink()
    with pytest.raises(E.EvaluationError, match=r"no output for 1 reference\(s\), e.g. \['0802'\] .*or with x4 "
                                                r"after the name as DIV2K's LR files have it"):
        E.evaluate_folders(div2k_named, hr, 4, metrics="psnr_y")
    Image.fromarray(_photo(48, 64, 0)).save(bad / "0801.png")
    Image.fromarray(_photo(48, 64, 1)).save(bad / "Img.png")
    (hr / "0802.png").rename(hr / "img.png")
    with pytest.raises(E.EvaluationError, match=r"case-sensitive, and these differ only in case: \['img / Img'\]"):
        E.evaluate_folders(bad, hr, 4, metrics="psnr_y")


def test_hidden_files_are_skipped_and_every_format_the_upscaler_reads_is_scored(tmp_path):
    """macOS's ._0801.png beside 0801.png made the run demand an output for '._0801'; a .ppm
    reference (which fluxsr upscale reads) was passed over without a word."""
    hr, sr = tmp_path / "hr", tmp_path / "sr"
    hr.mkdir(), sr.mkdir()
    ref = _photo(48, 64, 3)
    Image.fromarray(ref).save(hr / "0801.png")
    (hr / "._0801.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble resource fork")
    Image.fromarray(_photo(48, 64, 4)).save(hr / "scan.ppm")
    for name, img in (("0801", ref), ("scan", _photo(48, 64, 4))):
        Image.fromarray(_noisy(img, 6)).save(sr / f"{name}.png")
    assert sorted(E.list_images(hr)) == ["0801", "scan"]
    rep = E.evaluate_folders(sr, hr, 4, metrics="psnr_y")
    assert sorted(rep.images) == ["0801", "scan"] and rep.notes == []


def test_a_protocol_metric_built_alone_cuts_the_border_its_label_says():
    a, b = _photo(), _noisy(_photo(), 12)
    cut, whole = E.build_metric("psnr_y", crop_border=4), E.build_metric("psnr_y")
    assert "4-px border cut" in cut.label and "no border cut" in whole.label
    assert cut(b, a) == E.psnr_y(b, a, 4) != whole(b, a) == E.psnr_y(b, a)
    assert E.build_metric("ssim_y", crop_border=4)(b, a) == E.ssim_y(b, a, 4)


def test_a_console_that_cannot_encode_the_table_still_gets_it_and_the_files(tmp_path):
    """On a cp1252 stdout (a Windows redirect) printing the table's arrows raised after every
    metric was computed, and --json/--markdown were never written (exit 2)."""
    import os
    import subprocess

    hr, sr = tmp_path / "hr", tmp_path / "sr"
    hr.mkdir(), sr.mkdir()
    Image.fromarray(_photo(48, 64, 1)).save(hr / "a.png")
    Image.fromarray(_noisy(_photo(48, 64, 1), 6)).save(sr / "a.png")
    js, md = tmp_path / "t.json", tmp_path / "t.md"
    done = subprocess.run([sys.executable, "-m", "fluxsr_training.evaluate", str(sr), "-r", str(hr), "--metrics",
                           "psnr_y", "--json", str(js), "--markdown", str(md)], capture_output=True,
                          env={**os.environ, "PYTHONIOENCODING": "cp1252"}, timeout=300)
    assert done.returncode == 0, done.stderr.decode("cp1252", "replace")
    assert b"| method | PSNR-Y ? |" in done.stdout and js.is_file() and "PSNR-Y ↑" in md.read_text("utf-8")


def test_a_device_that_is_not_there_is_said_before_the_images_are_read(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(E, "evaluate_folders", lambda *a, **k: pytest.fail("images read before the device check"))
    assert E.main_eval([str(tmp_path), "-r", str(tmp_path), "--device", "tpu"]) == 2
    assert "unknown device" in capsys.readouterr().err
