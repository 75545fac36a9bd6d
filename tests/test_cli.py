"""`fluxsr upscale` end to end on tiny random models: files written, skips, failures, messages."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from fluxsr_core import cli


def model_args(files):
    return ["--transformer", str(files.transformer), "--vae", str(files.vae), "--lora", str(files.lora),
            "--conditioning", str(files.conditioning), "--device", "cpu", "--dtype", "fp32", "-q"]


def test_missing_model_files_say_what_is_needed(tmp_path, photo_png, capsys, monkeypatch):
    for var in ("FLUXSR_TRANSFORMER", "FLUXSR_VAE", "FLUXSR_LORA", "FLUXSR_CONDITIONING"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(cli, "demo_defaults", lambda: None)
    code = cli.main(["upscale", str(photo_png), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    for needed in ("--transformer", "--vae", "--lora", "--conditioning", "flux1-dev.safetensors", "ae.safetensors",
                   "models/fluxsr"):
        assert needed in err
    assert not (tmp_path / "out").exists()


def test_folder_output_bad_file_fails_alone(tmp_path, photo_png, tiny_model_files, capsys):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    gray16 = tmp_path / "gray16.png"
    Image.fromarray((np.linspace(0, 65535, 24 * 16).reshape(16, 24)).astype(np.uint16)).save(gray16)
    rgba = tmp_path / "rgba.png"
    a = np.zeros((16, 16, 4), np.uint8)
    a[..., 0] = 200
    a[..., 3] = np.linspace(0, 255, 16, dtype=np.uint8)[None, :]
    Image.fromarray(a, "RGBA").save(rgba)
    out = tmp_path / "out"
    code = cli.main(["upscale", str(photo_png), str(broken), str(gray16), str(rgba), "-o", str(out),
                     "--scale", "2"] + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 1
    assert "Traceback" not in err
    assert "broken.png" in err and "1 failed" in err and "3 upscaled" in err
    # the run settings and where they came from are reported (T_L from the bundle/LoRA metadata)
    assert "T_L=0.3" in err and "guidance=2" in err
    with Image.open(out / "astronaut.png") as im:
        assert im.size == (80, 64) and im.mode == "RGB"
    with Image.open(out / "gray16.png") as im:
        assert im.size == (48, 32) and im.mode.startswith("I")   # 16-bit grayscale kept
    with Image.open(out / "rgba.png") as im:
        assert im.mode == "RGBA" and im.size == (32, 32)
        alpha = np.asarray(im)[..., 3].astype(float)
        assert alpha[:, 0].mean() < 40 and alpha[:, -1].mean() > 215  # alpha upscaled apart
    assert not (out / "broken.png").exists()


def test_images_are_saved_while_the_next_upscales_and_a_failed_save_fails_alone(tmp_path, photo_png,
                                                                              tiny_model_files, capsys, monkeypatch):
    """Each save runs in a worker thread during the next image's upscale (one pending at most);
    a save that fails (here an I/O error, simulated) is reported for its image, in order, naming
    the file it could not write, and the other images are written."""
    import errno
    import threading

    from fluxsr_core import images

    sources = []
    for name in ("a", "b", "c"):
        sources.append(tmp_path / f"{name}.png")
        sources[-1].write_bytes(photo_png.read_bytes())
    out = tmp_path / "out"
    threads, original = [], images.save_image

    def save(path, *args, **kwargs):
        threads.append(threading.current_thread().name)
        if Path(path).name == "b.png":
            raise OSError(errno.EIO, "Input/output error")
        return original(path, *args, **kwargs)

    monkeypatch.setattr(images, "save_image", save)
    code = cli.main(["upscale"] + [str(p) for p in sources] + ["-o", str(out), "--overwrite", "--scale", "2"]
                    + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert "2 upscaled, 0 skipped, 1 failed" in err
    lines = [line for line in err.splitlines() if line.startswith(("ok ", "FAIL "))]
    assert [line.split()[0] + " " + Path(line.split()[1].rstrip(":")).name for line in lines] == \
        ["ok a.png", "FAIL b.png", "ok c.png"]
    assert f"FAIL {sources[1]}: cannot write {out / 'b.png'}: Input/output error" in err
    assert len(threads) == 3 and all(name.startswith("fluxsr-save") for name in threads)
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "c.png"]  # no temporary files


def test_an_output_that_would_replace_an_input_is_refused(tmp_path, photo_png, tiny_model_files, capsys):
    folder = tmp_path / "ip"
    folder.mkdir()
    (folder / "a.png").write_bytes(photo_png.read_bytes())
    (folder / "b.jpg").write_bytes(b"not looked at")
    before = (folder / "a.png").read_bytes()
    for target in (folder, folder / "a.png"):
        args = [str(folder / "a.png")] if target.suffix else [str(folder)]
        code = cli.main(["upscale", *args, "-o", str(target), "--overwrite"] + model_args(tiny_model_files))
        assert code == 2 and "is also an input" in capsys.readouterr().err
    assert (folder / "a.png").read_bytes() == before and sorted(p.name for p in folder.iterdir()) == ["a.png", "b.jpg"]


def test_output_places_checked_before_loading(tmp_path, photo_png, tiny_model_files, capsys, monkeypatch):
    second = tmp_path / "second.png"
    second.write_bytes(photo_png.read_bytes())
    taken = tmp_path / "taken"
    taken.write_bytes(b"a file")
    code = cli.main(["upscale", str(photo_png), str(second), "-o", str(taken)] + model_args(tiny_model_files))
    assert code == 2 and "is an existing file, not a folder" in capsys.readouterr().err
    # a folder whose name ends in .png is a folder
    as_folder = tmp_path / "results.png"
    as_folder.mkdir()
    assert cli.main(["upscale", str(photo_png), "-o", str(as_folder), "--scale", "2"] + model_args(tiny_model_files)) == 0
    assert (as_folder / photo_png.name).is_file()
    # a folder that cannot be written is named before any model loads (root may write anywhere: simulated)
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("models loaded"))
    code = cli.main(["upscale", str(photo_png), "-o", str(locked / "sub")] + model_args(tiny_model_files))
    assert code == 2 and f"cannot write into {locked}" in capsys.readouterr().err


def test_impossible_sizes_are_refused_by_the_parser(tmp_path, photo_png, capsys):
    for bad in (["--scale", "inf"], ["--megapixels", "nan"], ["--long-side", "0"], ["--long-side", "-5"],
                ["--guidance", "nan"], ["--lora-scale", "inf"], ["--max-output-megapixels", "1e-9"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(["upscale", str(photo_png), "-o", str(tmp_path / "o"), *bad])
        assert exc.value.code == 2, bad
        assert "must be" in capsys.readouterr().err


def test_a_huge_header_is_refused_before_its_pixels_are_decoded(tmp_path, photo_png, tiny_model_files, capsys):
    """A PNG that claims 12000x12000 pixels (and holds a few bytes): the output limit is checked
    on the header, so the file is refused as too large, not decoded (it would fail as truncated)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 12000, 12000, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    code = cli.main(["upscale", str(bomb), str(photo_png), "-o", str(tmp_path / "out")] + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 1 and "48000x48000" in err and "more than the limit" in err and "truncated" not in err
    assert (tmp_path / "out" / photo_png.name).is_file()  # the other input still ran


def test_ctrl_c_keeps_what_is_done_and_says_how_to_go_on(tmp_path, photo_png, tiny_model_files, capsys, monkeypatch):
    from fluxsr_core import upscaler

    sources = []
    for name in ("a", "b", "c"):
        sources.append(tmp_path / f"{name}.png")
        sources[-1].write_bytes(photo_png.read_bytes())
    calls, real = [], upscaler.upscale_loaded_image

    def stop_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(upscaler, "upscale_loaded_image", stop_at_the_second)
    out = tmp_path / "out"
    code = cli.main(["upscale", *map(str, sources), "-o", str(out), "--scale", "2"] + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 130 and "Traceback" not in err
    assert "interrupted" in err and "1 upscaled, 2 not done" in err and "Run the same command again" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # written whole; no temporary files


def test_a_grey_palette_image_stays_grey(tmp_path, tiny_model_files, capsys):
    grey = Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (24, 1))).convert("P")
    assert grey.mode == "P"
    grey.save(tmp_path / "g.gif")
    assert cli.main(["upscale", str(tmp_path / "g.gif"), "-o", str(tmp_path / "o.png"), "--scale", "2"]
                    + model_args(tiny_model_files)) == 0
    with Image.open(tmp_path / "o.png") as im:
        assert im.mode == "L" and im.size == (64, 48)


def test_existing_outputs_are_skipped_unless_overwrite(tmp_path, photo_png, tiny_model_files, capsys):
    target = tmp_path / "result.png"
    target.write_bytes(b"keep me")
    code = cli.main(["upscale", str(photo_png), "-o", str(target)] + model_args(tiny_model_files))
    assert code == 0 and target.read_bytes() == b"keep me"
    assert "exists" in capsys.readouterr().err
    code = cli.main(["upscale", str(photo_png), "-o", str(target), "--overwrite", "--megapixels", "0.003"]
                    + model_args(tiny_model_files))
    assert code == 0
    err = capsys.readouterr().err
    assert "0.003 megapixels (command line)" in err and "scale=" not in err  # what was asked, not a scale
    with Image.open(target) as im:
        assert im.size == (61, 49)
    code = cli.main(["upscale", str(photo_png), "-o", str(target), "--overwrite", "--long-side", "64"]
                    + model_args(tiny_model_files))
    assert code == 0
    with Image.open(target) as im:
        assert im.size == (64, 51) or im.size == (64, 52)


def test_wrong_file_for_transformer_is_named(tmp_path, photo_png, tiny_model_files, capsys):
    args = model_args(tiny_model_files)
    args[args.index("--transformer") + 1] = str(tiny_model_files.vae)
    code = cli.main(["upscale", str(photo_png), "-o", str(tmp_path / "o")] + args)
    err = capsys.readouterr().err
    assert code == 2 and "VAE" in err and "Traceback" not in err


@pytest.mark.parametrize("extra,msg", [(["--t-l", "1.5"], "T_L"), (["--tile", "100"], "multiple of 16"),
                                       (["--tile", "256", "--tile-overlap", "256"], "overlap"),
                                       # in pixels, as typed, not in latent units
                                       (["--tile", "0"], "--tile must be a positive multiple of 16 pixels (got 0)"),
                                       (["--tile-overlap", "-16"],
                                        "--tile-overlap must be 0 or a positive multiple of 16 pixels (got -16)"),
                                       (["--vae-tile", "-8"], "--vae-tile must be 0 (untiled) or a positive"),
                                       (["--vae-tile", "64", "--vae-tile-norm", "tile"],
                                        "--vae-overlap (128 px, its default) must be smaller than --vae-tile (64 px) "
                                        "with --vae-tile-norm tile; a quarter of the tile is usual: --vae-overlap 16"),
                                       (["--vae-overlap", "12"], "--vae-overlap must be 0 or a positive multiple"),
                                       (["--speedups", "turbo"], "unknown speed-up"),
                                       (["--speedups", "compile,compile_cudagraphs"], "one of compile"),
                                       (["--speedups", "fuse_qkv", "--no-merge-lora"], "LoRA merged"),
                                       (["--speedups", "compile_cudagraphs", "--memory-mode", "model_offload"],
                                        "compile_cudagraphs needs the weights resident")])
def test_impossible_settings(tmp_path, photo_png, tiny_model_files, capsys, extra, msg):
    code = cli.main(["upscale", str(photo_png), "-o", str(tmp_path / "o")] + model_args(tiny_model_files) + extra)
    assert code == 2 and msg in capsys.readouterr().err


def test_small_vae_tiles_of_the_default_whole_image_tiling_need_no_overlap(tmp_path, photo_png, capsys):
    """--vae-tile 64 was refused as smaller than the default --vae-overlap 128, which the default
    tiling (--vae-tile-norm image, halos of the convolutions' reach) does not use at all."""
    from fluxsr_core.demo_model import demo_paths

    out = tmp_path / "o.png"
    assert cli.main(["upscale", str(photo_png), "-o", str(out), *demo_paths().cli_args(), "--device", "cpu", "-q",
                     "--scale", "2", "--vae-tile", "64"]) == 0, capsys.readouterr().err
    assert Image.open(out).size == tuple(2 * s for s in Image.open(photo_png).size)


def test_many_inputs_to_a_file_name_is_refused(tmp_path, photo_png, capsys):
    second = tmp_path / "second.png"
    second.write_bytes(photo_png.read_bytes())
    code = cli.main(["upscale", str(photo_png), str(second), "-o", str(tmp_path / "x.png")])
    assert code == 2 and "there are 2 inputs; give a folder" in capsys.readouterr().err


def test_the_same_file_given_twice_is_named_as_such(tmp_path, photo_png, capsys):
    """Twice by the same name, by a linked folder, or once by name and once in its folder: one file,
    so the message says so (not "rename one of each"), and nothing is loaded or written."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "b.png").write_bytes(photo_png.read_bytes())
    (tmp_path / "link").symlink_to(folder)
    out = tmp_path / "out"
    for inputs, said in (([folder / "b.png", folder / "b.png"], f"{folder / 'b.png'} is given twice"),
                         ([folder / "b.png", tmp_path / "link" / "b.png"],
                          f"{folder / 'b.png'} and {tmp_path / 'link' / 'b.png'} are the same file"),
                         ([folder, folder / "b.png"], f"{folder / 'b.png'} is given twice")):
        for target in (out, tmp_path / "one.png"):
            code = cli.main(["upscale", *map(str, inputs), "-o", str(target)])
            err = capsys.readouterr().err
            assert code == 2 and said in err and "give each input once" in err and "rename" not in err, inputs
    assert not out.exists() and not (tmp_path / "one.png").exists()


def test_speedups_give_the_same_image(tmp_path, photo_png, tiny_model_files, capsys):
    """fuse_qkv + channels_last_vae change the arithmetic's layout, not the picture (fp32, CPU)."""
    outs = []
    for extra in ([], ["--speedups", "fuse_qkv,channels_last_vae"]):
        target = tmp_path / f"o{len(outs)}.png"
        assert cli.main(["upscale", str(photo_png), "-o", str(target)] + model_args(tiny_model_files) + extra) == 0
        outs.append(np.asarray(Image.open(target), dtype=np.int16))
    capsys.readouterr()
    assert outs[0].shape == outs[1].shape and np.abs(outs[0] - outs[1]).max() <= 1


def test_models_that_do_not_fit_get_advice(tmp_path, photo_png, tiny_model_files, capsys, monkeypatch):
    from fluxsr_core import models

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 72.00 MiB")

    monkeypatch.setattr(models, "load_transformer", out_of_memory)
    code = cli.main(["upscale", str(photo_png), "-o", str(tmp_path / "o")] + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 2 and "do not fit on cpu" in err and "fp8_storage" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").iterdir())


def test_fp8_modes_give_the_same_image_built_directly_or_cast_after_loading(tmp_path, photo_png, tiny_model_files,
                                                                           capsys, monkeypatch):
    """--memory-mode fp8_storage_all builds the fp8 model as the file loads (LoRA merged on the way),
    with fuse_qkv too (fused on the way). Both give the same picture."""
    from fluxsr_core import models

    direct, original = [], models.load_transformer_fp8
    monkeypatch.setattr(models, "load_transformer_fp8", lambda *a, **k: direct.append(a) or original(*a, **k))
    outs = []
    for extra in (["--memory-mode", "fp8_storage_all"],
                  ["--memory-mode", "fp8_storage_all", "--speedups", "fuse_qkv"]):
        target = tmp_path / f"o{len(outs)}.png"
        assert cli.main(["upscale", str(photo_png), "-o", str(target)] + model_args(tiny_model_files) + extra) == 0
        outs.append(np.asarray(Image.open(target), dtype=np.int16))
    capsys.readouterr()
    assert len(direct) == 2  # neither run loaded the model in full precision first
    assert np.abs(outs[0] - outs[1]).max() <= 2


def test_memory_mode_auto_is_the_default_and_says_what_it_chose(tmp_path, photo_png, tiny_model_files, capsys):
    assert cli.main(["upscale", str(photo_png), "-o", str(tmp_path / "o.png")] + model_args(tiny_model_files)) == 0
    assert "memory mode none (auto: cpu: the weights live in RAM whatever the mode)" in capsys.readouterr().err


def test_broken_links_in_a_folder_are_reported_and_counted(tmp_path, photo_png, tiny_model_files, capsys):
    """A folder's broken links with an image name are failed before the models load, by name,
    and counted; the folder's images still run. Other names are not looked at."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(photo_png.read_bytes())
    (folder / "gone.jpg").symlink_to(tmp_path / "deleted.jpg")
    (folder / "notes.txt").symlink_to(tmp_path / "deleted.txt")
    out = tmp_path / "out"
    code = cli.main(["upscale", str(folder), "-o", str(out), "--scale", "2"] + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"FAIL {folder / 'gone.jpg'}: " in err and "broken symbolic link" in err and "deleted.jpg" in err
    assert err.index("gone.jpg") < err.index("fluxsr: device")  # said before the models load
    assert "1 upscaled, 0 skipped, 1 failed" in err and f"  failed: {folder / 'gone.jpg'}: " in err
    assert "notes.txt" not in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]


def test_a_broken_link_given_as_input_is_an_error_naming_it(tmp_path, photo_png, tiny_model_files, capsys,
                                                            monkeypatch):
    link = tmp_path / "photo.png"
    link.symlink_to(tmp_path / "moved-away.png")
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("models loaded for nothing"))
    code = cli.main(["upscale", str(link), "-o", str(tmp_path / "out")] + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"FAIL {link}: " in err and "broken symbolic link" in err and "moved-away.png" in err
    assert "0 upscaled, 0 skipped, 1 failed" in err
    assert not (tmp_path / "out").exists()
    # with a good input beside it, one output name still means one input
    code = cli.main(["upscale", str(photo_png), str(link), "-o", str(tmp_path / "o.png")] + model_args(tiny_model_files))
    assert code == 2 and "there are 2 inputs" in capsys.readouterr().err


def test_an_unwritable_output_folder_is_fine_when_every_output_exists(tmp_path, photo_png, tiny_model_files, capsys,
                                                                      monkeypatch):
    """Nothing would be written (all skipped as existing), so the folder's permissions do not matter;
    with --overwrite there is something to write, and the folder is refused before the models load."""
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / photo_png.name).write_bytes(b"keep me")
    real_access = os.access  # root may write anywhere: the lock is simulated
    monkeypatch.setattr(os, "access", lambda path, mode: False if Path(path) == locked else real_access(path, mode))
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("models loaded"))
    code = cli.main(["upscale", str(photo_png), "-o", str(locked)] + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 0 and "cannot write" not in err
    assert f"skip {photo_png}: {locked / photo_png.name} exists" in err and "nothing to do: all 1 output(s) exist" in err
    code = cli.main(["upscale", str(photo_png), "-o", str(locked), "--overwrite"] + model_args(tiny_model_files))
    assert code == 2 and f"cannot write into {locked}" in capsys.readouterr().err
    assert (locked / photo_png.name).read_bytes() == b"keep me"


def test_a_folder_entry_that_cannot_be_looked_at_is_reported(tmp_path, photo_png, monkeypatch):
    """An image-named entry whose stat fails (permission denied on it: simulated, root may read anything)
    is listed as unreadable with why, not dropped; subfolders and other names are not inputs."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_bytes(photo_png.read_bytes())
    (folder / "hidden.png").write_bytes(photo_png.read_bytes())
    (folder / "sub.png").mkdir()
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if self.name == "hidden.png":
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", stat)
    jobs, unreadable = cli.collect_jobs([folder], tmp_path / "out")
    assert [j.source.name for j in jobs] == ["a.png"] and jobs[0].target == tmp_path / "out" / "a.png"
    assert [(p.name, "Permission denied" in why) for p, why in unreadable] == [("hidden.png", True)]


def test_a_missing_input_file_fails_before_the_models_load(tmp_path, photo_png, tiny_model_files, capsys,
                                                          monkeypatch):
    """A missing file is named and counted as failed before minutes of model loading; the other
    inputs still run, and with nothing else to do the models never load."""
    missing = tmp_path / "typo.png"
    out = tmp_path / "out"
    code = cli.main(["upscale", str(missing), str(photo_png), "-o", str(out), "--scale", "2"]
                    + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"FAIL {missing}: image file not found" in err and "Check the path" in err
    assert err.index("typo.png") < err.index("fluxsr: device")  # said before the models load
    assert "1 upscaled, 0 skipped, 1 failed" in err and f"  failed: {missing}: " in err
    assert sorted(p.name for p in out.iterdir()) == [photo_png.name]
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("models loaded for nothing"))
    for target in (tmp_path / "out2", tmp_path / "one.png"):
        code = cli.main(["upscale", str(missing), "-o", str(target)] + model_args(tiny_model_files))
        err = capsys.readouterr().err
        assert code == 1 and f"FAIL {missing}: image file not found" in err and "0 upscaled, 0 skipped, 1 failed" in err
        assert not target.exists()


@pytest.mark.parametrize("error,advice", [(PermissionError(13, "Permission denied"), "check its permissions"),
                                          (OSError(5, "Input/output error"), "check that the disk")])
def test_a_folder_that_cannot_be_listed_fails_alone(tmp_path, photo_png, tiny_model_files, capsys, monkeypatch,
                                                    error, advice):
    """An input folder whose listing fails (simulated: root may list anything) is an input that
    cannot be read, like a broken link: named with why and what to do before the models load,
    counted as failed, and the other inputs still run."""
    locked = tmp_path / "locked"
    locked.mkdir()
    (locked / "a.png").write_bytes(photo_png.read_bytes())
    real_iterdir = Path.iterdir

    def iterdir(self):
        if self == locked:
            raise type(error)(error.errno, error.strerror, str(self))
        return real_iterdir(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    out = tmp_path / "out"
    code = cli.main(["upscale", str(locked), str(photo_png), "-o", str(out), "--scale", "2"]
                    + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and "fluxsr: error" not in err
    assert f"FAIL {locked}: the folder cannot be listed ({error.strerror})" in err and advice in err
    assert err.index("FAIL") < err.index("fluxsr: device")
    assert "1 upscaled, 0 skipped, 1 failed" in err
    assert sorted(p.name for p in out.iterdir()) == [photo_png.name]
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("models loaded for nothing"))
    code = cli.main(["upscale", str(locked), "-o", str(tmp_path / "out2")] + model_args(tiny_model_files))
    assert code == 1 and "0 upscaled, 0 skipped, 1 failed" in capsys.readouterr().err


def test_an_input_that_cannot_be_looked_at_is_reported(tmp_path, photo_png):
    """A given input whose stat fails other than by not existing (permission denied on the folder
    above it: simulated) is unreadable with why, not a generic error ending the run."""
    hidden = tmp_path / "hidden.png"
    hidden.write_bytes(photo_png.read_bytes())
    real_stat = Path.stat

    def stat(self, *args, **kwargs):
        if self == hidden:
            raise PermissionError(13, "Permission denied", str(self))
        return real_stat(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Path, "stat", stat)
        jobs, unreadable = cli.collect_jobs([hidden, photo_png], tmp_path / "out")
    assert [j.source for j in jobs] == [photo_png]
    assert [(p, "Permission denied" in why and "permissions" in why) for p, why in unreadable] == [(hidden, True)]


def test_a_bundle_and_a_lora_that_disagree_are_warned_about(tmp_path, photo_png, tiny_model_files, capsys):
    """The bundle's value wins (documented order); the user hears of the LoRA's, unless they chose."""
    from fluxsr_core import bundle
    from fluxsr_core.settings import RunSettings

    ours = bundle.load_bundle(tiny_model_files.conditioning)
    other = bundle.save_bundle(tmp_path / "other-bundle.safetensors", ours.t5, ours.clip_pooled,
                               RunSettings(t_l=0.4, guidance=2.0))
    args = ["upscale", str(photo_png), "-o", str(tmp_path / "a.png"), "--scale", "2", "--quiet",
            *model_args(tiny_model_files)]
    args[args.index("--conditioning") + 1] = other
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert re.search(r"warning: the conditioning bundle and the LoRA disagree: T_L 0\.4 \(bundle \S*other-bundle"
                     r"\.safetensors\) against 0\.3 \(LoRA \S*fluxsr-lora\.safetensors\)\.", err)
    assert "guidance 2" not in err  # both say 2: no disagreement there
    assert "T_L=0.4 (bundle" in err
    assert cli.main(args[:1] + [args[1], "-o", str(tmp_path / "b.png")] + args[4:] + ["--t-l", "0.35"]) == 0
    assert "disagree" not in capsys.readouterr().err


def test_bad_headers_fail_before_the_models_load(tmp_path, photo_png, tiny_model_files, capsys, monkeypatch):
    """Not an image, empty, a PNG cut inside its header, and an output over the limit (the size asked
    by long side: the advice is a long side) are each found from the header, named and counted
    before the models load; the good input still runs, and alone they never load the models."""
    bad = {"text.png": b"hello, not an image\n", "empty.png": b"",
           "cut.png": photo_png.read_bytes()[:40]}
    for name, data in bad.items():
        (tmp_path / name).write_bytes(data)
    out = tmp_path / "out"
    inputs = [str(tmp_path / name) for name in bad]
    code = cli.main(["upscale", *inputs, str(photo_png), "-o", str(out), "--long-side", "64"]
                    + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    loaded_at = err.index("fluxsr: device")
    for name, said in (("text.png", "not an image"), ("empty.png", "empty (0 bytes)"),
                       ("cut.png", "starts like a PNG file")):
        assert f"FAIL {tmp_path / name}: " in err and said in err, name
        assert err.index(f"FAIL {tmp_path / name}") < loaded_at, name  # said before the models load
    assert "1 upscaled, 0 skipped, 3 failed" in err and sorted(p.name for p in out.iterdir()) == [photo_png.name]
    # D5: the log says what was asked for, not a scale nobody gave
    assert "long side 64 px (command line)" in err[loaded_at:] and "scale=" not in err

    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("models loaded for nothing"))
    code = cli.main(["upscale", *inputs, str(photo_png), "-o", str(tmp_path / "out2"), "--long-side", "4000",
                     "--max-output-megapixels", "1"] + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 1 and "0 upscaled, 0 skipped, 4 failed" in err
    assert f"FAIL {photo_png}: the output would be 4000x3200" in err
    assert "Lower the long side (at most 1118 px for this 40x32 input)" in err
    assert not (tmp_path / "out2").exists()


def test_heic_photos_in_a_folder_are_said_without_pillow_heif(tmp_path, photo_png, capsys, monkeypatch):
    """A phone's folder of HEIC photos, pillow-heif not installed: the scan passed them over in
    silence (a folder of them alone "holds no images"). Each now fails by name, saying what to install."""
    from fluxsr_core import images
    from fluxsr_core.demo_model import demo_paths

    monkeypatch.setattr(images, "_register_optional_openers", lambda: False)
    folder = tmp_path / "phone"
    folder.mkdir()
    (folder / "a.png").write_bytes(photo_png.read_bytes())
    (folder / "IMG_0002.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic" + bytes(100))
    code = cli.main(["upscale", str(folder), "-o", str(tmp_path / "out"), *demo_paths().cli_args(), "--device", "cpu",
                     "-q", "--scale", "2"])
    err = capsys.readouterr().err
    assert code == 1 and f"FAIL {folder / 'IMG_0002.HEIC'}: '{folder / 'IMG_0002.HEIC'}' is a HEIC file" in err, err
    assert "install the pillow-heif plugin" in err and "1 upscaled, 0 skipped, 1 failed" in err


def test_pixel_values_out_of_range_fail_before_the_models_load(tmp_path, photo_png, tiny_model_files, capsys,
                                                              monkeypatch):
    """A float TIFF with HDR highlights and a 32-bit integer TIFF with values above 16 bits are
    refused for their values, which only the pixels tell: they are read before the models load and
    fail with the loader's own message; the good input still runs, and alone they load nothing."""
    from fluxsr_core import images

    hdr = np.random.default_rng(0).random((16, 24)).astype(np.float32) * np.float32(0.9)
    hdr[:3, :3] = 4.0
    Image.fromarray(hdr, mode="F").save(tmp_path / "hdr.tif")
    Image.fromarray(np.array([[0, 10, 70000, 255]] * 4, np.int32), mode="I").save(tmp_path / "int32.tif")
    bad = [tmp_path / "hdr.tif", tmp_path / "int32.tif"]
    expected = {}
    for path in bad:
        with pytest.raises(images.PixelRangeError) as exc:
            images.load_image(path)
        expected[path] = str(exc.value)
    out = tmp_path / "out"
    code = cli.main(["upscale", *map(str, bad), str(photo_png), "-o", str(out), "--scale", "2"]
                    + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    loaded_at = err.index("fluxsr: device")
    for path in bad:
        assert f"FAIL {path}: {expected[path]}\n" in err, path.name
        assert err.index(f"FAIL {path}") < loaded_at, path.name  # said before the models load
    assert "1 upscaled, 0 skipped, 2 failed" in err and sorted(p.name for p in out.iterdir()) == [photo_png.name]

    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("models loaded for nothing"))
    code = cli.main(["upscale", *map(str, bad), "-o", str(tmp_path / "out2")] + model_args(tiny_model_files))
    assert code == 1 and "0 upscaled, 0 skipped, 2 failed" in capsys.readouterr().err


def test_a_grey_photo_saved_as_rgb_comes_back_grey_and_rgb(tmp_path, capsys):
    """A black-and-white photo stored as RGB (three equal channels) comes back grey, as from the
    ComfyUI node (the demo model tints grey a little), and still as a 3-channel RGB file, with a
    note saying so; a colour photo in the same run keeps its colour, EXIF and resolution."""
    from skimage import data

    from fluxsr_core.demo_model import demo_paths

    colour = np.asarray(Image.fromarray(data.astronaut()).resize((40, 32), Image.LANCZOS))
    grey = np.asarray(Image.fromarray(colour).convert("L"))
    Image.fromarray(np.stack([grey] * 3, axis=-1)).save(tmp_path / "grey.png")
    exif = Image.Exif()
    exif[271] = "Canon"  # Make: the photo's metadata travels with it (see test_images for the rules)
    from PIL import PngImagePlugin

    text = PngImagePlugin.PngInfo()
    text.add_text("Title", "Astronaut")
    text.add_itxt("XML:com.adobe.xmp", '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/'
                  '1999/02/22-rdf-syntax-ns#"><rdf:Description xmlns:exif="http://ns.adobe.com/exif/1.0/" '
                  'xmlns:xmp="http://ns.adobe.com/xap/1.0/" exif:PixelXDimension="40" xmp:Rating="3"/>'
                  '</rdf:RDF></x:xmpmeta>')
    Image.fromarray(colour).save(tmp_path / "colour.png", exif=exif, dpi=(240, 240), pnginfo=text)
    with Image.open(tmp_path / "grey.png") as im:
        assert im.mode == "RGB"
    out = tmp_path / "out"
    code = cli.main(["upscale", str(tmp_path / "grey.png"), str(tmp_path / "colour.png"), "-o", str(out),
                     "--scale", "2", *demo_paths().cli_args(), "--device", "cpu", "-q"])
    err = capsys.readouterr().err
    assert code == 0, err
    with Image.open(out / "grey.png") as im:
        assert im.mode == "RGB" and im.size == (80, 64)
        result = np.asarray(im).astype(int)
    assert np.array_equal(result[..., 0], result[..., 1]) and np.array_equal(result[..., 1], result[..., 2])
    assert result.std() > 20  # a picture, not a flat grey
    with Image.open(out / "colour.png") as im:
        assert im.mode == "RGB" and im.getexif()[271] == "Canon"
        assert im.text["Title"] == "Astronaut"
        assert b'exif:PixelXDimension="80" xmp:Rating="3"' in im.info["xmp"]
        assert im.info["dpi"] == pytest.approx((240, 240), abs=0.01)  # PNG stores pixels per metre
        result = np.asarray(im).astype(int)
    assert np.abs(result[..., 0] - result[..., 2]).mean() > 10  # still in colour
    assert f"note {tmp_path / 'grey.png'}: a grey picture" in err and "colour.png: a grey" not in err


def test_an_input_without_read_permission_fails_clearly_before_loading(tmp_path, photo_png, tiny_model_files,
                                                                       capsys, monkeypatch):
    """Opening it is refused (simulated: tests run as root): a FAIL line saying so and what to check,
    not a raw Errno after the models load; the other input still runs."""
    from PIL import Image as PILImage

    locked = tmp_path / "locked.png"
    locked.write_bytes(photo_png.read_bytes())
    real_open = PILImage.open

    def open_(fp, *args, **kwargs):
        if Path(fp) == locked:
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PILImage, "open", open_)
    out = tmp_path / "out"
    code = cli.main(["upscale", str(locked), str(photo_png), "-o", str(out), "--scale", "2"]
                    + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 1 and "Errno" not in err
    assert f"FAIL {locked}: cannot read '{locked}': permission denied; check its permissions" in err
    assert err.index("FAIL") < err.index("fluxsr: device")
    assert "1 upscaled, 0 skipped, 1 failed" in err and sorted(p.name for p in out.iterdir()) == [photo_png.name]


def test_an_output_that_is_a_broken_link_is_refused_before_loading(tmp_path, photo_png, tiny_model_files, capsys,
                                                                   monkeypatch):
    """-o naming a link to a folder that is not there (an unmounted drive), or a place under one, or a
    .png name that is such a link: a usage error naming the link and its target, nothing computed."""
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("models loaded for nothing"))
    dangling = tmp_path / "dangling_out"
    dangling.symlink_to(tmp_path / "unmounted" / "outdir")
    file_link = tmp_path / "one.png"
    file_link.symlink_to(tmp_path / "unmounted" / "one.png")
    for target, link in ((dangling, dangling), (dangling / "sub", dangling), (file_link, file_link)):
        code = cli.main(["upscale", str(photo_png), "-o", str(target)] + model_args(tiny_model_files))
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, target
        assert f"'{link}' is a broken symbolic link" in err and str(tmp_path / "unmounted") in err, target
    assert not (tmp_path / "unmounted").exists()


def test_an_output_name_taken_by_a_folder_fails_before_loading(tmp_path, photo_png, tiny_model_files, capsys,
                                                               monkeypatch):
    """out/astronaut.png is a folder: not "skipped: exists", and not a failure after the upscale
    showing a temporary name; a FAIL naming the folder, with or without --overwrite, and the folder
    is left alone."""
    monkeypatch.setattr(cli, "_load_pipeline", lambda *a: pytest.fail("models loaded for nothing"))
    out = tmp_path / "out"
    (out / photo_png.name).mkdir(parents=True)
    for extra in ([], ["--overwrite"]):
        code = cli.main(["upscale", str(photo_png), "-o", str(out)] + model_args(tiny_model_files) + extra)
        err = capsys.readouterr().err
        assert code == 1 and f"skip {photo_png}" not in err and ".tmp" not in err, extra
        assert f"FAIL {photo_png}: cannot write {out / photo_png.name}: a folder of that name is in the way" in err
        assert "0 upscaled, 0 skipped, 1 failed" in err
    assert (out / photo_png.name).is_dir() and list((out / photo_png.name).iterdir()) == []


def test_a_full_disk_stops_the_run_and_keeps_what_is_done(tmp_path, photo_png, tiny_model_files, capsys,
                                                          monkeypatch):
    """The second write fails with ENOSPC (simulated): its FAIL line names the file, the run stops
    (every later write would fail too; the image upscaled meanwhile is not written, the last is never
    upscaled), the finished output is kept, and the log says how to go on. Exit 1, like failures."""
    import errno

    from fluxsr_core import images, upscaler

    sources = []
    for name in ("a", "b", "c", "d"):
        sources.append(tmp_path / f"{name}.png")
        sources[-1].write_bytes(photo_png.read_bytes())
    out = tmp_path / "out"
    original_save, original_upscale, upscaled = images.save_image, upscaler.upscale_loaded_image, []

    def save(path, *args, **kwargs):
        if Path(path).name == "b.png":
            raise OSError(errno.ENOSPC, "No space left on device")
        return original_save(path, *args, **kwargs)

    def upscale(loaded, *args, **kwargs):
        upscaled.append(Path(loaded.path).name)
        return original_upscale(loaded, *args, **kwargs)

    monkeypatch.setattr(images, "save_image", save)
    monkeypatch.setattr(upscaler, "upscale_loaded_image", upscale)
    code = cli.main(["upscale", *map(str, sources), "-o", str(out), "--scale", "2"] + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"FAIL {sources[1]}: cannot write {out / 'b.png'}: No space left on device" in err
    assert upscaled == ["a.png", "b.png", "c.png"]
    assert f"not written: {sources[2]} (the disk is full" in err  # upscaled while the failing write ran
    assert f"stopped: no room left to write in {out}" in err and "The 1 finished output(s) are kept; 2 image(s) not " \
        "done. Free some space and run the same command again" in err
    assert "1 upscaled, 0 skipped, 1 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]


def test_sigterm_stops_like_ctrl_c_and_the_old_handler_comes_back(tmp_path, photo_png, tiny_model_files, capsys,
                                                                  monkeypatch):
    """SIGTERM (kill, timeout, a scheduler) during the second upscale: the first image's write is
    finished, the counts are printed, no temporary file is left; exit 143; the caller's own SIGTERM
    handler is back afterwards (here one that fails the test if fluxsr let SIGTERM through)."""
    import signal

    from fluxsr_core import upscaler

    def not_handled(signum, frame):
        raise AssertionError("SIGTERM reached the caller's handler during the run")

    old = signal.signal(signal.SIGTERM, not_handled)
    try:
        sources = []
        for name in ("a", "b", "c"):
            sources.append(tmp_path / f"{name}.png")
            sources[-1].write_bytes(photo_png.read_bytes())
        calls, real = [], upscaler.upscale_loaded_image

        def terminated_at_the_second(*args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                signal.raise_signal(signal.SIGTERM)  # the handler runs before this returns
            return real(*args, **kwargs)

        monkeypatch.setattr(upscaler, "upscale_loaded_image", terminated_at_the_second)
        out = tmp_path / "out"
        code = cli.main(["upscale", *map(str, sources), "-o", str(out), "--scale", "2"]
                        + model_args(tiny_model_files))
        err = capsys.readouterr().err
        assert signal.getsignal(signal.SIGTERM) is not_handled
    finally:
        signal.signal(signal.SIGTERM, old)
    assert code == 143 and "Traceback" not in err
    assert "terminated (SIGTERM)" in err and "1 upscaled, 2 not done, 0 failed" in err and "Run the same command" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # written whole; no temporary files


def test_a_second_ctrl_c_while_the_last_write_finishes_still_reports(tmp_path, photo_png, tiny_model_files, capsys,
                                                                     monkeypatch):
    """Ctrl-C during the second upscale, and again while the first image's write is waited for: the
    write is still finished and reported, the counts are printed, no temporary file is left."""
    from concurrent.futures import Future

    from fluxsr_core import upscaler

    sources = []
    for name in ("a", "b", "c"):
        sources.append(tmp_path / f"{name}.png")
        sources[-1].write_bytes(photo_png.read_bytes())
    calls, real_upscale, real_result = [], upscaler.upscale_loaded_image, Future.result
    second_interrupt = []

    def interrupted_while_waiting(self, *args, **kwargs):
        if not second_interrupt:  # the first wait after the first Ctrl-C: a second Ctrl-C
            second_interrupt.append(1)
            raise KeyboardInterrupt
        return real_result(self, *args, **kwargs)

    def ctrl_c_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            monkeypatch.setattr(Future, "result", interrupted_while_waiting)
            raise KeyboardInterrupt
        return real_upscale(*args, **kwargs)

    monkeypatch.setattr(upscaler, "upscale_loaded_image", ctrl_c_at_the_second)
    out = tmp_path / "out"
    code = cli.main(["upscale", *map(str, sources), "-o", str(out), "--scale", "2"] + model_args(tiny_model_files))
    err = capsys.readouterr().err
    assert second_interrupt and code == 130 and "Traceback" not in err
    assert f"finishing the write of {out / 'a.png'}" in err and f"ok   {sources[0]} -> {out / 'a.png'}" in err
    assert "interrupted after" in err and "1 upscaled, 2 not done, 0 failed" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]


def test_folder_scans_skip_hidden_files_and_take_heic_when_it_can_be_read(tmp_path, photo_png, monkeypatch):
    """.hidden.png and macOS's ._x.png AppleDouble files are not inputs of a folder scan (one given by
    name is); .heic files are, where pillow-heif is installed (simulated), and else fail by name."""
    from fluxsr_core import images

    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.png", ".hidden.png", "._a.png", "photo.heic"):
        (folder / name).write_bytes(photo_png.read_bytes())
    monkeypatch.setattr(images, "optional_image_suffixes", lambda: frozenset())
    jobs, unreadable = cli.collect_jobs([folder], tmp_path / "out")
    assert [j.source.name for j in jobs] == ["a.png"]
    assert [(p.name, why.split(": ")[1]) for p, why in unreadable] == [("photo.heic", "install the pillow-heif plugin "
                                                                        "(pip install pillow-heif), or convert it to "
                                                                        "PNG or JPEG")]
    jobs, _ = cli.collect_jobs([folder / ".hidden.png"], tmp_path / "out")
    assert [j.target.name for j in jobs] == [".hidden.png"]
    monkeypatch.setattr(images, "optional_image_suffixes", lambda: frozenset({".heic", ".heif"}))
    jobs, _ = cli.collect_jobs([folder], tmp_path / "out")
    assert [j.source.name for j in jobs] == ["a.png", "photo.heic"]
    assert jobs[1].target == tmp_path / "out" / "photo.png"


def test_folder_scans_take_every_format_pillow_reads(tmp_path, photo_png):
    """A camera's .mpo, a .jfif, netpbm's .pgm/.ppm: read when named, and found by a folder scan too."""
    folder = tmp_path / "in"
    folder.mkdir()
    with Image.open(photo_png) as im:
        rgb = im.convert("RGB")
        rgb.save(folder / "cam.mpo", format="MPO")
        rgb.save(folder / "a.jfif", format="JPEG")
        rgb.convert("L").save(folder / "scan.pgm")
        rgb.save(folder / "b.ppm")
    jobs, unreadable = cli.collect_jobs([folder], tmp_path / "out")
    assert sorted(j.source.name for j in jobs) == ["a.jfif", "b.ppm", "cam.mpo", "scan.pgm"] and unreadable == []


def test_output_names_a_folder_with_a_slash_and_other_image_suffixes_are_refused(tmp_path, photo_png,
                                                                                 tiny_model_files, capsys):
    """-o x.png/ is a folder (created, the output inside it); -o x.exr, x.jxl... are file names in
    formats FluxSR does not write, refused as .jpg is, not silently made into folders."""
    for suffix in (".exr", ".hdr", ".jxl", ".avif", ".heic", ".jp2"):
        target = tmp_path / f"x{suffix}"
        code = cli.main(["upscale", str(photo_png), "-o", str(target)] + model_args(tiny_model_files))
        err = capsys.readouterr().err
        assert code == 2 and "outputs are written as PNG" in err and f"-o {tmp_path / 'x.png'}" in err, suffix
        assert not target.exists(), suffix
    target = tmp_path / "x.png"
    assert cli.main(["upscale", str(photo_png), "-o", f"{target}/", "--scale", "2"] + model_args(tiny_model_files)) == 0
    assert target.is_dir() and sorted(p.name for p in target.iterdir()) == [photo_png.name]


def test_a_link_in_a_folder_to_one_of_its_images_is_upscaled_once(tmp_path, photo_png):
    """Not "given twice": the user named the folder, not the file; the link is skipped."""
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "img1.png").write_bytes(photo_png.read_bytes())
    (folder / "latest.png").symlink_to("img1.png")
    jobs, unreadable = cli.collect_jobs([folder], tmp_path / "out")
    assert [j.source.name for j in jobs] == ["img1.png"] and unreadable == []
    # under the file's own name also when the link sorts first (it was a_alias.png -> out/a_alias.png)
    (folder / "a_alias.png").symlink_to("img1.png")
    jobs, _ = cli.collect_jobs([folder], tmp_path / "out")
    assert [(j.source.name, j.target.name) for j in jobs] == [("img1.png", "img1.png")]
    (folder / "a_alias.png").unlink()
    with pytest.raises(cli.UsageError, match="are the same file; give each input once"):
        cli.collect_jobs([folder / "img1.png", folder / "latest.png"], tmp_path / "out")
    for inputs in ([folder / "img1.png", folder], [folder, folder / "img1.png"]):  # typed and scanned: either order
        with pytest.raises(cli.UsageError, match="give each input once"):
            cli.collect_jobs(inputs, tmp_path / "out")


def test_jpeg_and_webp_outputs_with_their_quality_limits_and_notes(tmp_path, capsys):
    """`--format jpg|webp` (a folder) or a .jpg/.webp -o (one input): 8-bit files at `--quality`,
    with the metadata each holds. What a format cannot take is said before the models load (a
    WebP side over 16,383 px, transparency in a JPEG), and as a note where only something of
    the file is lost (16 bits, a PNG's Title in a WebP, an alpha that is opaque everywhere)."""
    from PIL import PngImagePlugin
    from skimage import data

    from fluxsr_core.demo_model import demo_paths

    photo = Image.fromarray(data.astronaut()).resize((40, 32), Image.LANCZOS)
    exif = Image.Exif()
    exif[271] = "Canon"
    text = PngImagePlugin.PngInfo()
    text.add_text("Title", "Astronaut")
    photo.save(tmp_path / "colour.png", exif=exif, pnginfo=text)
    see_through = np.full((16, 16, 4), 200, np.uint8)
    see_through[..., 3] = 128
    Image.fromarray(see_through).save(tmp_path / "alpha.png")
    opaque = np.asarray(photo.convert("RGBA")).copy()
    Image.fromarray(opaque).save(tmp_path / "opaque.png")  # a screenshot's RGBA, alpha 255 everywhere
    Image.fromarray((np.arange(256).reshape(16, 16) * 250).astype(np.uint16)).save(tmp_path / "deep.png")
    Image.new("RGB", (8200, 2)).save(tmp_path / "wide.png")
    model = [*demo_paths().cli_args(), "--device", "cpu", "-q", "--scale", "2"]

    def run(*args):
        code = cli.main(["upscale", *args, *model])
        return code, capsys.readouterr().err

    def path(name):
        return str(tmp_path / name)

    sources = [path(n) for n in ("colour.png", "alpha.png", "deep.png", "wide.png")]
    code, err = run(*sources, "-o", path("webp"), "--format", "webp", "--quality", "90")
    assert code == 1 and "3 upscaled, 0 skipped, 1 failed" in err, err
    assert (f"FAIL {path('wide.png')}: the output's long side would be 16,400 pixels, but WebP holds at most "
            "16,383; write PNG (--format png, or a .png -o)") in err
    assert err.index("FAIL") < err.index("fluxsr: device")  # before the models load
    assert f"note {path('deep.png')}: its samples have more than 8 bits; WebP is written with 8" in err
    assert f"note {tmp_path / 'webp' / 'colour.webp'}: WebP has no place for the text Title" in err
    with Image.open(tmp_path / "webp" / "colour.webp") as im:
        assert im.format == "WEBP" and im.size == (80, 64) and im.getexif()[271] == "Canon"
    with Image.open(tmp_path / "webp" / "alpha.webp") as im:
        assert im.mode == "RGBA"
    code, err = run(path("colour.png"), path("alpha.png"), path("opaque.png"), "-o", path("jpg"), "--format", "jpg")
    assert code == 1 and f"FAIL {path('alpha.png')}: it has transparency, which JPEG cannot hold" in err, err
    assert err.index(f"FAIL {path('alpha.png')}") < err.index("fluxsr: device")
    assert f"note {path('opaque.png')}: its alpha channel is opaque everywhere; the JPEG is written without it" in err
    with Image.open(tmp_path / "jpg" / "colour.jpg") as im:
        assert im.format == "JPEG" and im.getexif()[271] == "Canon"
    with Image.open(tmp_path / "jpg" / "opaque.jpg") as im:
        assert im.mode == "RGB" and im.size == (80, 64)
    code, err = run(path("colour.png"), "-o", path("jpg"), "--format", "jpg")
    assert code == 0 and f"skip {path('colour.png')}: {tmp_path / 'jpg' / 'colour.jpg'} exists" in err
    sizes = {}
    for quality in ("20", "100"):  # the quality reaches the encoder
        out = tmp_path / f"q{quality}.jpg"
        assert run(path("colour.png"), "-o", str(out), "--quality", quality)[0] == 0
        sizes[quality] = out.stat().st_size
    assert sizes["20"] < sizes["100"] / 2, sizes
    code, err = run(path("colour.png"), "-o", path("x.jpg"), "--format", "webp")
    assert code == 2 and "names a jpg file but --format is webp" in err
    code, err = run(path("colour.png"), "-o", path("x.png"), "--quality", "80")
    assert code == 2 and "--quality is for JPEG and WebP outputs; these are PNG" in err
    with pytest.raises(SystemExit):
        run(path("colour.png"), "-o", path("x.jpg"), "--quality", "abc")
    assert "must be a whole number from 1 to 100 (got abc)" in capsys.readouterr().err


def test_an_in_place_jpeg_run_can_be_run_again(tmp_path, capsys):
    """`-o` the input folder with --format jpg: the second run (after a Ctrl-C, or for new files)
    takes a.jpg for a.png's output, not an input whose output clashes with a.png's."""
    from fluxsr_core.demo_model import demo_paths

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (24, 16), (90, 30, 160)).save(folder / "a.png")
    args = ["upscale", str(folder), "-o", str(folder), "--format", "jpg", *demo_paths().cli_args(),
            "--device", "cpu", "-q", "--scale", "2"]
    assert cli.main(args) == 0 and (folder / "a.jpg").exists()
    capsys.readouterr()
    Image.new("RGB", (24, 16)).save(folder / "b.png")
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert f"skip {folder / 'a.png'}: {folder / 'a.jpg'} exists" in err and "1 upscaled, 1 skipped" in err, err


def test_an_in_place_png_run_over_jpegs_can_be_run_again(tmp_path, capsys):
    """`-o` the input folder of JPEGs, PNG outputs: the rerun takes a.png for a.jpg's output (not
    an input whose output a.png is itself, refused as replacing its input) and says why it is skipped."""
    from fluxsr_core.demo_model import demo_paths

    folder = tmp_path / "photos"
    folder.mkdir()
    Image.new("RGB", (24, 16), (90, 30, 160)).save(folder / "a.jpg")
    args = ["upscale", str(folder), "-o", str(folder), *demo_paths().cli_args(), "--device", "cpu", "-q", "--scale", "2"]
    assert cli.main(args) == 0 and Image.open(folder / "a.png").size == (48, 32)
    capsys.readouterr()
    Image.new("RGB", (24, 16)).save(folder / "b.jpg")
    assert cli.main(args) == 0
    err = capsys.readouterr().err
    assert f"skip {folder / 'a.jpg'}: {folder / 'a.png'} exists (taken for its output by an earlier run" in err, err
    assert "1 upscaled, 1 skipped" in err and Image.open(folder / "b.png").size == (48, 32)


def test_overwrite_in_place_refuses_to_replace_a_file_that_may_be_a_picture_of_its_own(tmp_path, capsys):
    """A folder holding a.png and a different photo a.jpg, upscaled in place to JPEG with
    --overwrite: a.jpg would be taken for a.png's earlier output and replaced. Refused before
    anything is written, naming both files; both are left as they were."""
    from fluxsr_core.demo_model import demo_paths

    folder = tmp_path / "mix"
    folder.mkdir()
    Image.new("RGB", (24, 16), (90, 30, 160)).save(folder / "a.png")
    Image.new("RGB", (40, 40), (10, 200, 10)).save(folder / "a.jpg")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    args = ["upscale", str(folder), "-o", str(folder), "--format", "jpg", "--overwrite", *demo_paths().cli_args(),
            "--device", "cpu", "-q", "--scale", "2"]
    assert cli.main(args) == 2
    err = capsys.readouterr().err
    assert f"--overwrite would replace {folder / 'a.jpg'}, taken for the output of {folder / 'a.png'}" in err, err
    assert "write to another folder with -o" in err
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before

def test_the_lora_is_reported_with_its_notes(tmp_path, photo_png, tiny_model_files, capsys):
    """What the LoRA file turned out to be (rank, alpha, layers, merged) and its notes, here a
    FLUX.1-schnell base in its metadata: said before the upscale. Before, a LoRA's notes (text-encoder
    tensors ignored, namings converted, ...) reached no user of the CLI."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(tiny_model_files.lora), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        metadata = {**(f.metadata() or {}), "modelspec.architecture": "flux-1-schnell/lora"}
    schnell = tmp_path / "schnell-lora.safetensors"
    save_file(tensors, str(schnell), metadata=metadata)
    args = model_args(tiny_model_files)
    args[args.index("--lora") + 1] = str(schnell)
    args.remove("-q")
    assert cli.main(["upscale", str(photo_png), "-o", str(tmp_path / "out.png"), "--scale", "1"] + args) == 0
    err = capsys.readouterr().err
    assert "fluxsr: LoRA schnell-lora.safetensors: rank 4, alpha 4" in err and "merged into the weights" in err
    assert ("fluxsr: LoRA: its metadata says it was trained on FLUX.1-schnell "
            "(modelspec.architecture='flux-1-schnell/lora')") in err


def test_a_decimal_output_limit_is_the_pixels_it_says_and_a_smaller_output_is_noted(tmp_path, capsys):
    """--max-output-megapixels 0.001956 let 1955 pixels through (int() of 1955.9999999999998), so an
    output of exactly the limit was refused; 4.1 and 8.2 lost a pixel too. And a long side below
    the input's downscales, which is now said."""
    from fluxsr_core.demo_model import demo_paths

    source = tmp_path / "strip.png"
    Image.new("RGB", (12, 163), (90, 30, 160)).save(source)
    common = [*demo_paths().cli_args(), "--device", "cpu", "-q"]
    assert cli.main(["upscale", str(source), "-o", str(tmp_path / "same.png"), "--scale", "1",
                     "--max-output-megapixels", "0.001956", *common]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert cli.main(["upscale", str(source), "-o", str(tmp_path / "small.png"), "--long-side", "80", *common]) == 0
    err = capsys.readouterr().err
    assert Image.open(tmp_path / "small.png").size == (6, 80)
    assert f"note {tmp_path / 'small.png'}: 6x80 is smaller than the input: it was scaled down" in err


def test_a_refusal_just_over_the_limit_says_the_exact_pixels():
    from fluxsr_core.images import OutputTooLargeError, target_size

    with pytest.raises(OutputTooLargeError, match=r"8193x8192 = 67,117,056 pixels, 67.1 megapixels, more than the limit "
                                                  r"of 67,108,864 pixels, 67.1 MP"):
        target_size(8192, 8193, scale=1, max_output_pixels=8192 * 8192)
