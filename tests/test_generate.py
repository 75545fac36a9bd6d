"""Teacher pairs: prompts and seeds, the core sampler, resume without duplicates, ranks, text encoders, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fluxsr_core import flow, models
from fluxsr_core.bundle import save_bundle
from fluxsr_core.pairs import PairDataError, PairDataset, pair_id, verify_pairs
from fluxsr_core.settings import RunSettings
from fluxsr_training import generate as G
from fluxsr_training.cli import main as cli_main
from fluxsr_training.config_io import ConfigError


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def cli_log_handlers_removed():
    """fluxsr-train points the root logger at sys.stdout, which in a test is capsys' stream,
    closed after it: later tests' log lines would print "--- Logging error ---" tracebacks."""
    import logging

    root = logging.getLogger()
    before = set(root.handlers)
    yield
    for handler in set(root.handlers) - before:
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    g = torch.Generator().manual_seed(0)
    bundle = save_bundle(root / "cond.safetensors", torch.randn(1, 8, 32, generator=g), torch.randn(1, 16, generator=g),
                         RunSettings())
    prompts = root / "prompts.txt"
    prompts.write_text("a cat\n\na dog\na bird\n")
    return root, Path(bundle), prompts


def cfg_args(inputs, out: Path) -> list[str]:
    root, bundle, prompts = inputs
    return ["transformer=tiny", "vae=tiny", "dtype=fp32", "device=cpu", f"prompts={str(prompts)!r}",
            f"output={str(out)!r}", f"bundle={str(bundle)!r}", "steps=3", "height=32", "width=48", "pairs_per_prompt=2",
            "shard_size=2", "fsync=false", "progress_bar=false", "init_seed=5"]


def cfg_for(inputs, out: Path, *extra: str) -> G.GenerateConfig:
    return G.load_generate_config(None, [*cfg_args(inputs, out), *extra])


def read_all(folder: Path) -> dict[str, dict]:
    ds = PairDataset(folder, load_trajectory=True)
    return {i: ds[k] for k, i in enumerate(ds.ids)}


# --- prompts and seeds -------------------------------------------------------------------------

def test_prompt_files_and_seeds(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("  first prompt \n\nsecond\n")
    assert G.read_prompts(txt) == [("first prompt", None, 1), ("second", None, 3)]  # (prompt, seed, line)
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt": "x", "seed": 40}\n\n{"prompt": "y"}\n')
    assert G.read_prompts(jl) == [("x", 40, 1), ("y", None, 3)]
    jobs = G.make_jobs(G.read_prompts(jl), seed=100, pairs_per_prompt=2)
    assert [(j.index, j.seed, j.line) for j in jobs] == [(0, 40, 1), (0, 41, 1), (1, 102, 3), (1, 103, 3)]
    assert [(j.index, j.seed, j.line) for j in G.make_jobs([("x", None)], seed=5)] == [(0, 5, None)]
    assert jobs[0].pair_id == pair_id(0, 40) == "p000000-s40"
    assert [j.index for j in G.jobs_for_rank(jobs, 1, 2)] == [1, 1]
    for bad in (-1, 2 ** 63):
        jl.write_text(f'{{"prompt": "x", "seed": {bad}}}\n')
        with pytest.raises(ValueError, match=r"from 0 to 2\*\*63 - 1"):
            G.read_prompts(jl)
    with pytest.raises(ValueError, match="seeds past 2"):
        G.make_jobs([("x", None)], seed=2 ** 63 - 1, pairs_per_prompt=2)
    # lines end at newlines only (not at NEL or U+2028 inside a prompt); a BOM is no prompt text
    txt.write_bytes("\ufeffa cat\x85 on a mat\r\nsecond\u2028line\n".encode("utf-8"))
    assert G.read_prompts(txt) == [("a cat\x85 on a mat", None, 1), ("second\u2028line", None, 2)]
    txt.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="p.txt is not UTF-8"):
        G.read_prompts(txt)
    jl.write_text('not json\n')
    with pytest.raises(ValueError, match="line 1 is not JSON"):
        G.read_prompts(jl)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="holds no prompts"):
        G.read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FileNotFoundError):
        G.read_prompts(tmp_path / "missing.txt")
    # the noise of a pair depends on its seed only
    assert torch.equal(G.noise_for(7, 32, 48), G.noise_for(7, 32, 48)) and G.noise_for(7, 32, 48).shape == (16, 4, 6)


# --- sampling, resume ---------------------------------------------------------------------------

def test_pairs_come_from_the_core_sampler_and_a_stopped_run_resumes_without_duplicates(inputs, tmp_path):
    root, bundle, _ = inputs
    full = G.generate_pairs(cfg_for(inputs, tmp_path / "full", "save_trajectory=true"))
    assert full.written == [pair_id(i, s) for i, s in [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)]]

    # stopped after 3 pairs (limit), then resumed: the rest only, nothing twice
    first = G.generate_pairs(cfg_for(inputs, tmp_path / "part", "save_trajectory=true", "limit=3"))
    assert len(first.written) == 3 and first.stopped_by_limit
    second = G.generate_pairs(cfg_for(inputs, tmp_path / "part", "save_trajectory=true"))
    assert second.skipped == 3 and sorted(first.written + second.written) == sorted(full.written)
    third = G.generate_pairs(cfg_for(inputs, tmp_path / "part", "save_trajectory=true"))
    assert third.written == [] and third.skipped == 6
    report = verify_pairs(tmp_path / "part")
    assert report.ok and report.pairs == 6 and not [p for p in report.problems if p.kind == "duplicate"]

    a, b = read_all(tmp_path / "full"), read_all(tmp_path / "part")
    assert a.keys() == b.keys()
    for k in a:
        for t in ("eps", "z0", "image", "trajectory"):
            assert torch.equal(a[k][t], b[k][t]), (k, t)

    # each pair is the core's Euler sampler over the teacher from noise_for(seed)
    item = a[pair_id(1, 3)]
    assert torch.equal(item["eps"], G.noise_for(3, 32, 48)) and torch.equal(item["eps"], flow.seeded_noise(3, 32, 48)[0])
    teacher = models.DiffusersVelocity(models.load_transformer("tiny", dtype="fp32", device=None, seed=5))
    from fluxsr_core.bundle import load_bundle

    cond = load_bundle(bundle).to_conditioning(3.5)
    sigmas = flow.flux_sigmas(3, (4 // 2) * (6 // 2))
    with torch.no_grad():
        z0 = flow.euler_sample(teacher, item["eps"][None], sigmas, cond)[0]
    assert torch.allclose(item["z0"], z0, atol=1e-6)
    assert item["trajectory"].shape == (3, 16, 4, 6) and torch.equal(item["trajectory"][-1], item["z0"])
    codec = models.DiffusersCodec(models.load_vae("tiny", dtype="fp32", device=None, seed=5))
    with torch.no_grad():
        img = (codec.decode(item["z0"][None])[0] * 255).round().to(torch.uint8)
    assert item["image"].shape == (3, 32, 48) and (item["image"].int() - img.int()).abs().max() <= 1
    m = item["meta"]
    assert (m["seed"], m["prompt"], m["prompt_index"], m["steps"], m["height"], m["width"]) == (3, "a dog", 1, 3, 32, 48)
    assert m["sigmas"] == pytest.approx(sigmas.tolist(), abs=1e-7) and m["guidance"] == 3.5
    assert len({it["cond_key"] for it in a.values()}) == 1  # one fixed bundle: stored once


def test_a_resume_with_other_settings_or_an_edited_prompt_file_is_refused(inputs, tmp_path):
    """Pair ids follow prompt lines and seeds: a rerun that would skip stored pairs made with
    another size, step count or guidance, or from another prompt, must not mix them in."""
    from fluxsr_training.config_io import ConfigError

    out = tmp_path / "run"
    G.generate_pairs(cfg_for(inputs, out, "save_image=false", "limit=2"))
    for change, msg in (("steps=4", "steps 3 .stored. vs 4 .now."), ("height=64", "height 32 .stored. vs 64"),
                        ("guidance=7", "guidance 3.5 .stored. vs 7")):
        with pytest.raises(ConfigError, match=f"other settings: {msg}"):
            G.generate_pairs(cfg_for(inputs, out, "save_image=false", change))
    edited = tmp_path / "edited.txt"
    edited.write_text("a new first line\na cat\na dog\na bird\n")
    with pytest.raises(ConfigError, match="made from the prompt 'a cat', but line 1 .* is now 'a new first line'"):
        G.generate_pairs(cfg_for(inputs, out, "save_image=false", f"prompts={str(edited)!r}"))
    appended = tmp_path / "appended.txt"
    appended.write_text("a cat\n\na dog\na bird\na fish\n")  # new prompts at the end: fine
    r = G.generate_pairs(cfg_for(inputs, out, "save_image=false", f"prompts={str(appended)!r}"))
    assert r.skipped == 2 and len(r.written) == 6


def test_a_rerun_with_other_pairs_per_prompt_or_seed_is_refused(inputs, tmp_path, monkeypatch):
    """Prompt i's seeds are seed + i * pairs_per_prompt + j: a rerun into the same folder with another
    pairs_per_prompt or --seed was accepted silently, made nearly every pair again (other ids), and
    started some from another prompt's noise (e.g. 1 -> 2 pairs per prompt: prompt 1's first new
    pair has prompt 2's old seed). Pairs of a folder older than these recipe keys are still added to."""
    out = tmp_path / "run"
    G.generate_pairs(cfg_for(inputs, out, "save_image=false", "limit=3"))   # pairs_per_prompt=2, seed 0
    rec = PairDataset(out).records([pair_id(0, 0)])[pair_id(0, 0)]
    assert (rec["pairs_per_prompt"], rec["base_seed"]) == (2, 0)
    monkeypatch.setattr(models, "load_models", lambda *a, **k: pytest.fail("a model loaded before the refusal"))
    why = ("Pair seeds follow --seed + prompt index x --pairs-per-prompt, so other values would make nearly every "
           "pair again, some from another prompt's starting noise")
    for change, differ, flags in (
            ("pairs_per_prompt=1", "pairs_per_prompt 2 (stored) vs 1 (now)", "--pairs-per-prompt"),
            ("seed=1", "base_seed 0 (stored) vs 1 (now)", "--seed"),
            ("seed=7 pairs_per_prompt=3", "pairs_per_prompt 2 (stored) vs 3 (now), base_seed 0 (stored) vs 7 (now)",
             "--pairs-per-prompt, --seed")):
        with pytest.raises(ConfigError) as info:
            G.generate_pairs(cfg_for(inputs, out, "save_image=false", *change.split()))
        assert str(info.value) == (f"pair {pair_id(0, 0)} in {out} was made with other settings: {differ}; a folder "
                                   f"holds pairs made one way ({flags}): resume with the settings of that run, or "
                                   f"write to another --output. {why}")
    monkeypatch.undo()
    assert len(G.generate_pairs(cfg_for(inputs, out, "save_image=false")).written) == 3   # the same values: resumes

    # a prompt with its own JSONL seeds does not use --seed: its pairs record no base_seed
    jsonl = tmp_path / "seeded.jsonl"
    jsonl.write_text('{"prompt": "a cat", "seed": 40}\n{"prompt": "a dog"}\n')
    seeded = tmp_path / "seeded"
    G.generate_pairs(cfg_for(inputs, seeded, "save_image=false", f"prompts={str(jsonl)!r}", "limit=2"))
    assert "base_seed" not in PairDataset(seeded).records([pair_id(0, 40)])[pair_id(0, 40)]
    r = G.generate_pairs(cfg_for(inputs, seeded, "save_image=false", f"prompts={str(jsonl)!r}", "seed=2", "limit=1"))
    assert r.skipped == 2 and r.written == [pair_id(1, 4)]
    with pytest.raises(ConfigError, match=rf"^pair {pair_id(0, 40)} in {seeded} was made with other settings: "
                                          r"pairs_per_prompt 2 .stored. vs 1 .now.; "):
        G.generate_pairs(cfg_for(inputs, seeded, "save_image=false", f"prompts={str(jsonl)!r}", "pairs_per_prompt=1"))

    # a folder written before pairs_per_prompt and base_seed were recorded: nothing to compare them with
    old = tmp_path / "old"
    recipe = G.pair_recipe
    monkeypatch.setattr(G, "pair_recipe", lambda *a: {k: v for k, v in recipe(*a).items()
                                                     if k not in ("pairs_per_prompt", "base_seed")})
    G.generate_pairs(cfg_for(inputs, old, "save_image=false", "limit=2"))
    monkeypatch.undo()
    assert "pairs_per_prompt" not in PairDataset(old).records([pair_id(0, 0)])[pair_id(0, 0)]
    r = G.generate_pairs(cfg_for(inputs, old, "save_image=false", "pairs_per_prompt=1", "limit=1"))
    assert r.skipped == 1 and r.written == [pair_id(1, 1)]


def test_an_edited_prompt_is_named_by_its_line_in_the_file(inputs, tmp_path, monkeypatch):
    """Blank lines hold no prompt, so the prompt index is not the line number: the refusal names
    the line the user has to look at."""
    out = tmp_path / "run"
    G.generate_pairs(cfg_for(inputs, out, "save_image=false", "limit=4"))   # "a cat" (line 1), "a dog" (line 3)
    monkeypatch.setattr(models, "load_models", lambda *a, **k: pytest.fail("refused only after the model loaded"))
    edited_txt = tmp_path / "edited.txt"
    edited_txt.write_text("a cat\n\na horse\na bird\n")
    edited_jsonl = tmp_path / "edited.jsonl"
    edited_jsonl.write_text('{"prompt": "a cat"}\n\n\n{"prompt": "a horse"}\n{"prompt": "a bird"}\n')
    for path, line in ((edited_txt, 3), (edited_jsonl, 4)):
        with pytest.raises(ConfigError) as info:
            G.generate_pairs(cfg_for(inputs, out, "save_image=false", f"prompts={str(path)!r}"))
        assert str(info.value) == (f"pair {pair_id(1, 2)} in {out} was made from the prompt 'a dog', but line {line} "
                                   f"of {path} is now 'a horse' (ids follow the prompts' order, so an edited prompt "
                                   "file, or another one, cannot add to this folder): append new prompts at the end, "
                                   "or write to another --output")


def other_bundle(tmp_path: Path, length: int = 8, seed: int = 1) -> Path:
    g = torch.Generator().manual_seed(seed)
    return Path(save_bundle(tmp_path / f"cond-{length}-{seed}.safetensors", torch.randn(1, length, 32, generator=g),
                            torch.randn(1, 16, generator=g), RunSettings()))


def test_pairs_record_what_made_them_and_a_rerun_that_would_mix_others_in_is_refused(inputs, tmp_path, monkeypatch):
    """Another teacher, bundle, T5 length, dtype or fp8 storage used to be mixed in silently (one
    case crashing training later with advice about resolutions)."""
    root, bundle, prompts = inputs
    out = tmp_path / "run"
    G.generate_pairs(cfg_for(inputs, out, "save_image=false", "limit=2"))
    from fluxsr_core.bundle import load_bundle
    from fluxsr_core.pairs import conditioning_key

    b = load_bundle(bundle)
    rec = PairDataset(out).records([pair_id(0, 0)])[pair_id(0, 0)]
    assert {k: rec[k] for k in ("teacher_fingerprint", "teacher_weights", "dtype", "conditioning")} == {
        "teacher_fingerprint": "tiny:init_seed=5", "teacher_weights": "full", "dtype": "float32",
        "conditioning": f"bundle:{conditioning_key(b.t5, b.clip_pooled)}"}
    assert "max_sequence_length" not in rec                           # a bundle's T5 length is the bundle's

    for fn in ("load_models", "transformer_config_of"):                # refused before anything loads
        monkeypatch.setattr(models, fn, lambda *a, **k: pytest.fail("a model loaded before the refusal"))
    b2 = load_bundle(other_bundle(tmp_path))
    key2 = conditioning_key(b2.t5, b2.clip_pooled)
    for change, differ, flags in (
            ("init_seed=6", "teacher_fingerprint tiny:init_seed=5 of 'tiny' .stored. vs tiny:init_seed=6 of 'tiny' .now.",
             "--transformer, --init-seed"),
            (f"bundle={str(other_bundle(tmp_path))!r}",
             f"conditioning bundle:{conditioning_key(b.t5, b.clip_pooled)} .stored. vs bundle:{key2} .now.",
             "--bundle / --text-encoders / --clip / --t5"),
            ("dtype=bf16", "dtype float32 .stored. vs bfloat16 .now.", "--dtype"),
            ("memory_mode=fp8_storage", "teacher_weights full .stored. vs fp8_storage .now.", "--memory-mode")):
        with pytest.raises(ConfigError, match=rf"^pair {pair_id(0, 0)} in {out} was made with other settings: {differ}; "
                                              rf"a folder holds pairs made one way \({flags}\): resume with the settings "
                                              "of that run, or write to another --output$"):
            G.generate_pairs(cfg_for(inputs, out, "save_image=false", change))
    # a real teacher file: its fingerprint, not its name or place, identifies it
    tiny_file = tmp_path / "teacher.safetensors"
    tiny_file.write_bytes(b"x" * 3000)
    moved = tmp_path / "elsewhere" / "renamed.safetensors"
    moved.parent.mkdir()
    moved.write_bytes(b"x" * 3000)
    assert G.weights_fingerprint(tiny_file) == G.weights_fingerprint(moved) != G.weights_fingerprint(tmp_path / "run")
    moved.write_bytes(b"x" * 1500 + b"y" + b"x" * 1499)
    assert G.weights_fingerprint(tiny_file) != G.weights_fingerprint(moved)
    with pytest.raises(ConfigError, match=r"teacher_fingerprint tiny:init_seed=5 of 'tiny' .stored. vs 3000:\w{16} of "
                                          r"'teacher.safetensors' .now.; a folder holds pairs made one way \(--transformer\)"):
        G.generate_pairs(cfg_for(inputs, out, "save_image=false", f"transformer={str(tiny_file)!r}"))
    monkeypatch.undo()
    r = G.generate_pairs(cfg_for(inputs, out, "save_image=false"))    # the same settings: resumes
    assert r.skipped == 2 and len(r.written) == 4


def test_stored_images_record_their_vae_and_another_vae_is_refused(inputs, tmp_path, monkeypatch):
    """The stored images are the VAE's decodes: a rerun with another VAE mixed in other images
    without a word. Recorded (only with images: the latents owe the VAE nothing) and compared; a
    VAE path that does not exist is said before the output folder is made."""
    out = tmp_path / "run"
    G.generate_pairs(cfg_for(inputs, out, "limit=1"))
    rec = PairDataset(out).records([pair_id(0, 0)])[pair_id(0, 0)]
    assert rec["vae_fingerprint"] == "tiny:init_seed=5" and rec["vae"] == "tiny"
    for fn in ("load_models", "transformer_config_of"):
        monkeypatch.setattr(models, fn, lambda *a, **k: pytest.fail("a model loaded before the refusal"))
    other = tmp_path / "other-ae.safetensors"
    other.write_bytes(b"x" * 3000)
    with pytest.raises(ConfigError, match=rf"^pair {pair_id(0, 0)} in {out} was made with other settings: vae_fingerprint "
                                          r"tiny:init_seed=5 of 'tiny' .stored. vs 3000:\w{16} of 'other-ae.safetensors' "
                                          r".now.; a folder holds pairs made one way \(--vae\)"):
        G.generate_pairs(cfg_for(inputs, out, f"vae={str(other)!r}"))
    fresh = tmp_path / "fresh"
    with pytest.raises(FileNotFoundError, match="VAE not found: .*nowhere.safetensors. Pass the FLUX VAE"):
        G.generate_pairs(cfg_for(inputs, fresh, f"vae={str(tmp_path / 'nowhere.safetensors')!r}"))
    assert not fresh.exists()
    monkeypatch.undo()
    without_images = tmp_path / "latents"
    G.generate_pairs(cfg_for(inputs, without_images, "limit=1", "save_image=false"))
    rec = PairDataset(without_images).records([pair_id(0, 0)])[pair_id(0, 0)]
    assert "vae_fingerprint" not in rec and "vae" not in rec


def test_memory_mode_auto_keeps_the_teacher_weights_its_folder_was_made_with(inputs, tmp_path, monkeypatch):
    """auto chooses by free GPU memory, and an fp8 mode is part of the recipe: a rerun on a busier GPU
    was refused as "made with other settings", and ranks deciding alone could mix fp8 and full
    pairs. With pairs in the folder auto keeps their teacher_weights; on a fresh folder all ranks
    take the mode the tightest of them needs."""
    out = tmp_path / "run"
    first = G.generate_pairs(cfg_for(inputs, out, "save_image=false", "memory_mode=auto"))   # CPU: none, full weights
    assert len(first.written) == 6
    busy = ("fp8_storage", "9.0 GiB free; fp8_storage keeps 7.0 GiB of weights there")
    monkeypatch.setattr(models, "choose_memory_mode", lambda *a, **k: busy)
    again = G.generate_pairs(cfg_for(inputs, out, "save_image=false", "memory_mode=auto"))  # was refused
    assert again.skipped == 6 and again.written == []
    cpu = torch.device("cpu")
    mode, reason = G._resolve_memory_mode(cfg_for(inputs, out, "memory_mode=auto"), torch.float32, cpu)
    assert mode == "group_offload"                                   # keeps the weights whole, and fits
    assert f"the pairs in {out} were made with teacher_weights full" in reason and "stores them in fp8" in reason
    # pairs made with fp8 weights keep them, however much memory is free now
    monkeypatch.setattr(G, "_stored_records", lambda folder, ids=None: {
        pair_id(0, 0): {"prompt_index": 0, "teacher_weights": "fp8_storage_all"}})
    monkeypatch.setattr(models, "choose_memory_mode", lambda *a, **k: ("none", "80 GiB free"))
    assert G._resolve_memory_mode(cfg_for(inputs, out, "memory_mode=auto"), torch.float32, cpu)[0] == "fp8_storage_all"
    # a fresh folder, two ranks: the one with less free memory decides for both
    monkeypatch.setattr(G, "_stored_records", lambda folder, ids=None: {})
    monkeypatch.setattr(G, "_all_ranks", lambda value, world: [value, busy])
    mode, reason = G._resolve_memory_mode(cfg_for(inputs, tmp_path / "fresh", "memory_mode=auto"), torch.float32,
                                          cpu, world=2)
    assert mode == "fp8_storage" and reason.startswith("rank 1 needs it (9.0 GiB free")
    monkeypatch.setattr(G, "_all_ranks", lambda value, world: [value, ("group_offload", "2 GiB free")])
    assert G._resolve_memory_mode(cfg_for(inputs, tmp_path / "fresh", "memory_mode=auto"), torch.float32, cpu,
                                  world=2)[0] == "none"              # both store full weights: each its own mode
    assert G._resolve_memory_mode(cfg_for(inputs, tmp_path / "fresh", "memory_mode=none"), torch.float32, cpu,
                                  world=2) == ("none", "given")


def test_a_text_encoder_run_refuses_another_t5_length_also_in_a_dataset_older_than_the_recipe(inputs, tmp_path,
                                                                                                monkeypatch):
    te = tiny_text_encoders(tmp_path / "flux")
    enc = ("bundle=''", f"text_encoders={str(te)!r}", "save_image=false", "pairs_per_prompt=1")
    out = tmp_path / "te"
    G.generate_pairs(cfg_for(inputs, out, *enc, "max_sequence_length=6", "limit=1"))
    rec = PairDataset(out).records([pair_id(0, 0)])[pair_id(0, 0)]
    assert rec["max_sequence_length"] == 6 and rec["conditioning"].startswith("text-encoders:")
    monkeypatch.setattr(models, "load_models", lambda *a, **k: pytest.fail("a model loaded before the refusal"))
    with pytest.raises(ConfigError, match=r"other settings: max_sequence_length 6 .stored. vs 5 .now.; a folder holds "
                                          r"pairs made one way \(--max-sequence-length\)"):
        G.generate_pairs(cfg_for(inputs, out, *enc, "max_sequence_length=5"))

    # pairs made before the recipe keys: those keys are not compared, but the T5 length of the stored
    # conditionings still is (the trainer cannot batch 5 with 8 tokens)
    old = tmp_path / "old"
    recipe = G.pair_recipe
    monkeypatch.undo()
    monkeypatch.setattr(G, "pair_recipe", lambda *a: {k: v for k, v in recipe(*a).items()
                                                     if k in ("height", "width", "steps", "guidance")})
    G.generate_pairs(cfg_for(inputs, old, "limit=2", "save_image=false"))            # 8-token bundle
    monkeypatch.undo()
    assert "conditioning" not in PairDataset(old).records([pair_id(0, 0)])[pair_id(0, 0)]
    monkeypatch.setattr(models, "load_models", lambda *a, **k: pytest.fail("a model loaded before the refusal"))
    with pytest.raises(ConfigError, match=rf"^this run's T5 conditionings are 5 tokens long, but those of the pairs in "
                                          rf"{old} .e.g. p000000-s0. are 8: the trainer cannot batch them together"):
        G.generate_pairs(cfg_for(inputs, old, "save_image=false", f"bundle={str(other_bundle(tmp_path, 5))!r}"))
    monkeypatch.undo()
    r = G.generate_pairs(cfg_for(inputs, old, "save_image=false", f"bundle={str(other_bundle(tmp_path, 8))!r}"))
    assert len(r.written) == 4                                        # an old dataset keeps working


@pytest.mark.parametrize("when", ["after b's first pair", "while b samples its first batch"])
def test_two_writers_on_one_prompt_file_share_the_work_and_count_only_their_own(inputs, tmp_path, monkeypatch, when):
    """Two processes on one prompt file used to make every pair twice, each claiming all as new."""
    out = tmp_path / "shared"
    made_by_b, runs_of_a = [], []

    def a_runs_meanwhile():   # a (another machine, same prompt file) makes and stores all six
        if not runs_of_a:
            runs_of_a.append("running")
            runs_of_a[0] = G.generate_pairs(cfg_for(inputs, out, "save_image=false", "writer_prefix=a"))

    sample = G.sample_batch
    if when == "while b samples its first batch":   # then b's first shard, and the next add, find a's pairs
        def sample_then_a_runs(*a, **k):
            result = sample(*a, **k)
            a_runs_meanwhile()
            return result

        monkeypatch.setattr(G, "sample_batch", sample_then_a_runs)
        extra = ("batch_size=2", "shard_size=1")
    else:
        extra = ()
    b = G.generate_pairs(cfg_for(inputs, out, "save_image=false", "writer_prefix=b", *extra),
                         on_pair=lambda pid: (made_by_b.append(pid), a_runs_meanwhile()))
    [a] = runs_of_a
    every = [pair_id(i, s) for i, s in [(0, 0), (0, 1), (1, 2), (1, 3), (2, 4), (2, 5)]]
    assert a.written == every and a.made_by_others == []
    assert made_by_b == every[:2 if extra else 1]                      # b sampled one batch, not six pairs
    assert b.written == [] and sorted(b.made_by_others) == sorted(every)   # and stored none twice
    report = verify_pairs(out)
    assert report.ok and report.problems == [] and report.pairs == 6
    assert not list(out.glob("shard-b-*")) and PairDataset(out).ids == every


def test_a_second_prompt_file_written_into_the_folder_meanwhile_is_refused_at_once(inputs, tmp_path):
    """Ids follow prompt lines: another prompt file's line 1 is the same id as this one's."""
    out = tmp_path / "shared"
    mine = tmp_path / "mine.txt"
    mine.write_text("a boat\n\na car\na train\n")
    runs_of_a = []

    def a_runs_meanwhile(pid):
        if not runs_of_a:
            runs_of_a.append(G.generate_pairs(cfg_for(inputs, out, "save_image=false", "writer_prefix=a")))

    with pytest.raises(ConfigError, match=rf"^pair {pair_id(0, 1)} in {out} was made from the prompt 'a cat', but line 1 "
                                          rf"of {mine} is now 'a boat' .ids follow the prompts' order, so an edited prompt "
                                          "file, or another one, cannot add to this folder."):
        G.generate_pairs(cfg_for(inputs, out, "save_image=false", "writer_prefix=b", f"prompts={str(mine)!r}"),
                         on_pair=a_runs_meanwhile)
    assert len(runs_of_a[0].written) == 6
    # b's pair in hand had a's id: not stored (a conflict), so no pair of the folder is lost or doubled
    assert not list(out.glob("shard-b-*")) and verify_pairs(out).ok and verify_pairs(out).problems == []
    assert {r["prompt"] for r in PairDataset(out).records(PairDataset(out).ids).values()} == {"a cat", "a dog",
                                                                                              "a bird"}


def test_flag_paths_with_emoji_reach_the_config_and_verify_calls_an_empty_folder_no_dataset(inputs, tmp_path, capsys):
    """A flag's value became a TOML override through json.dumps, whose \\ud83d-style escapes of an
    emoji TOML refuses: `--output "pairs 📷"` stopped as a bad config. And `verify` called a
    folder without pairs (the wrong one, say) usable."""
    root, bundle, prompts = inputs
    out = tmp_path / "pairs 📷"
    args = ["pairs", "--transformer", "tiny", "--vae", "tiny", "--dtype", "fp32", "--device", "cpu",
            "--prompts", str(prompts), "--output", str(out), "--bundle", str(bundle), "--steps", "2", "--height", "16",
            "--width", "16", "--no-save-image", "--no-progress-bar", "--no-fsync", "--limit", "1"]
    assert cli_main(args) == 0, capsys.readouterr()
    assert len(PairDataset(out)) == 1
    capsys.readouterr()
    assert cli_main(["verify", str(out)]) == 0 and "is usable" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert cli_main(["verify", str(tmp_path / "empty")]) == 1
    said = capsys.readouterr().out
    assert "holds no pairs (no manifest-*.jsonl lists any): not a pair dataset, or not yet" in said
    assert "is usable" not in said


def test_verify_lists_damage_and_drop_bad_lets_pairs_make_the_lost_pairs_again(inputs, tmp_path, capsys):
    """A damaged or deleted shard blocked `pairs` and `train`, and the only advice was a Python call."""
    from fluxsr_core.pairs import PairWriter

    root, bundle, prompts = inputs
    out = tmp_path / "pairs"
    args = ["pairs", "--transformer", "tiny", "--vae", "tiny", "--dtype", "fp32", "--device", "cpu",
            "--prompts", str(prompts), "--output", str(out), "--bundle", str(bundle), "--steps", "2", "--height", "16",
            "--width", "16", "--shard-size", "1", "--writer-prefix", "node", "--no-save-image", "--no-progress-bar",
            "--no-fsync"]
    assert cli_main(args) == 0
    capsys.readouterr()
    before = {k: {t: item[t].clone() for t in ("eps", "z0")} for k, item in read_all(out).items()}  # not the mapped file
    truncated, deleted = out / "shard-node-rank0-000001.safetensors", out / "shard-node-rank0-000003.safetensors"
    damaged = truncated.read_bytes()[:1000]
    truncated.write_bytes(damaged)
    deleted.unlink()

    # pairs and train both stop, naming the command that lists and repairs
    hint = f"`fluxsr-train verify {out} --drop-bad`"
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert hint in err and "verify_pairs" not in err and str(truncated) in err
    assert cli_main(["train", "--config", "train_tiny", f"data.pairs={out}", f"train.output_dir={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err
    assert hint in err and "verify_pairs" not in err
    assert cli_main(["verify", str(out)]) == 1
    text = capsys.readouterr().out
    assert f"[truncated] {truncated}: shard has 1000 bytes" in text and f"[missing] {deleted}: shard file is missing" in text
    assert f"verify: 2 errors. `fluxsr-train verify {out} --drop-bad` sets the bad shards aside" in text

    with PairWriter(out, writer_id="node-rank0"):                       # the writer is running: left alone
        assert cli_main(["verify", str(out), "--drop-bad"]) == 1
    text = capsys.readouterr().out
    assert "left alone: writer node-rank0 is running" in text and not (out / "quarantine").exists()

    assert cli_main(["verify", str(out), "--drop-bad"]) == 0
    text = capsys.readouterr().out
    assert f"dropped 2 shards (2 pairs) from {out}; moved 1 files to {out / 'quarantine'}" in text
    assert f"{out} is usable now; run `fluxsr-train pairs` with the same arguments as before to make the 2 dropped" in text
    assert (out / "quarantine" / truncated.name).read_bytes() == damaged      # kept, not deleted
    assert PairDataset(out).ids == [pair_id(1, 1)]

    assert cli_main(args) == 0                                           # the lost pairs are made again
    assert "wrote 2 new pairs" in capsys.readouterr().out
    assert cli_main(["verify", str(out)]) == 0
    assert "is usable" in capsys.readouterr().out
    after = read_all(out)
    assert list(after) == list(before)
    for k in before:
        assert torch.equal(after[k]["eps"], before[k]["eps"]) and torch.equal(after[k]["z0"], before[k]["z0"])

    # a damaged conditioning file: set aside too, and pairs stores it again
    [cond] = out.glob("cond-*.safetensors")
    data = cond.read_bytes()
    cond.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    assert cli_main(["verify", str(out), "--drop-bad"]) == 1            # a missing cond until pairs runs again
    text = capsys.readouterr().out
    assert f"[missing-cond] {cond}" in text and "stored again by `fluxsr-train pairs`" in text
    assert (out / "quarantine" / cond.name).exists()
    assert cli_main(args) == 0 and cli_main(["verify", str(out)]) == 0
    assert cli_main(["verify", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_batched_sampling_matches_one_at_a_time(inputs, tmp_path):
    one = read_all(Path(G.generate_pairs(cfg_for(inputs, tmp_path / "b1", "save_image=false",
                                                 "pairs_per_prompt=1")).output))
    two = read_all(Path(G.generate_pairs(cfg_for(inputs, tmp_path / "b2", "save_image=false", "pairs_per_prompt=1",
                                                 "batch_size=2")).output))
    assert one.keys() == two.keys() and "image" not in next(iter(one.values()))
    for k in one:
        assert torch.allclose(one[k]["z0"], two[k]["z0"], atol=1e-5)


def test_parts_split_the_prompts_completely_whatever_each_parts_process_count():
    """--part K/N for independent runs: every prompt goes to exactly one (part, rank), each part's
    ranks share it evenly, also when the parts run with different process counts (a naive
    i % (N * W) split would leave prompts out then); whole prompts stay together."""
    jobs = G.make_jobs([(f"p{i}", None) for i in range(23)], seed=0, pairs_per_prompt=2)
    for worlds in ([1, 1, 1], [2, 1, 3], [4, 4, 4]):
        shares = [G.jobs_for_rank(jobs, r, w, (k, len(worlds))) for k, w in enumerate(worlds, 1) for r in range(w)]
        taken = sorted(j.pair_id for share in shares for j in share)
        assert taken == sorted(j.pair_id for j in jobs), worlds  # all, none twice
        for k, w in enumerate(worlds, 1):
            sizes = [len({j.index for j in G.jobs_for_rank(jobs, r, w, (k, len(worlds)))}) for r in range(w)]
            assert max(sizes) - min(sizes) <= 1, (worlds, k, sizes)
    assert G.jobs_for_rank(jobs, 0, 1, (1, 1)) == G.jobs_for_rank(jobs, 0, 1) == list(jobs)
    assert G.parse_part("") == (1, 1) and G.parse_part(" 2/4 ") == (2, 4)
    for bad in ("0/4", "5/4", "1", "a/b", "-1/2", "1/0"):
        with pytest.raises(ConfigError, match=r"part must be K/N with K from 1 to N.*SLURM_ARRAY_TASK_ID \+ 1"):
            G.parse_part(bad)


def test_independent_runs_with_parts_share_the_work_and_the_folder(inputs, tmp_path):
    """Two runs with --part 1/2 and 2/2 (each alone, no launcher) make every pair once between
    them, as writers of their own, into one folder; a third run without a part finds all stored."""
    common = ("writer_prefix=node", "pairs_per_prompt=1")
    first = G.generate_pairs(cfg_for(inputs, tmp_path / "shared", *common, "part='1/2'"))
    second = G.generate_pairs(cfg_for(inputs, tmp_path / "shared", *common, "part='2/2'"))
    assert (first.writer_id, second.writer_id) == ("node-part1of2-rank0", "node-part2of2-rank0")
    # without a prefix, no machine name: a rerun of the part on another node is the same writer
    assert G.generate_pairs(cfg_for(inputs, tmp_path / "alone", "pairs_per_prompt=1", "part='2/2'")).writer_id == \
        "part2of2-rank0"
    assert first.written == [pair_id(0, 0), pair_id(2, 2)] and second.written == [pair_id(1, 1)]
    again = G.generate_pairs(cfg_for(inputs, tmp_path / "shared", *common))
    assert again.written == [] and again.skipped == 3 and len(PairDataset(tmp_path / "shared")) == 3
    # a part run with an edited prompt file is refused, though the changed line is another part's
    root, bundle, prompts = inputs
    lines = prompts.read_text().splitlines()
    edited = tmp_path / "edited.txt"
    edited.write_text("\n".join([lines[0], "EDITED " + lines[1], *lines[2:]]) + "\n")
    with pytest.raises(ConfigError, match=r"pair p000001-s1 .* was made from the prompt"):
        G.generate_pairs(G.load_generate_config(None, [*cfg_args(inputs, tmp_path / "shared"), *common,
                                                       f"prompts={str(edited)!r}", "part='1/2'"]))


def test_ranks_split_the_prompts_and_share_the_folder(inputs, tmp_path, monkeypatch):
    import accelerate

    class FakeState:
        def __init__(self, rank):
            self.process_index, self.num_processes, self.is_local_main_process = rank, 2, rank == 0
            self.device = torch.device("cpu")

    results = []
    for rank in (0, 1):
        monkeypatch.setattr(accelerate, "PartialState", lambda cpu=False, rank=rank: FakeState(rank))
        results.append(G.generate_pairs(cfg_for(inputs, tmp_path / "shared", "writer_prefix=node", "pairs_per_prompt=1")))
    assert [r.writer_id for r in results] == ["node-rank0", "node-rank1"]
    assert results[0].written == [pair_id(0, 0), pair_id(2, 2)] and results[1].written == [pair_id(1, 1)]
    assert sorted(p.name for p in (tmp_path / "shared").glob("manifest-*")) == ["manifest-node-rank0.jsonl",
                                                                                   "manifest-node-rank1.jsonl"]
    assert len(PairDataset(tmp_path / "shared")) == 3


# --- text encoders ----------------------------------------------------------------------------

def tiny_text_encoders(folder: Path) -> Path:
    """A FLUX-pipeline-shaped folder with tiny random CLIP (16 wide) and T5 (32 wide) and tokenizers."""
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers
    from transformers import CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerFast, T5Config, T5EncoderModel

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "dog": 5, "bird": 6}
    tk = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                  model_max_length=6)
    tok.save_pretrained(folder / "tokenizer")
    tok.save_pretrained(folder / "tokenizer_2")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        CLIPTextModel(CLIPTextConfig(vocab_size=7, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=8, eos_token_id=1, pad_token_id=0,
                                     bos_token_id=0)).save_pretrained(folder / "text_encoder")
        T5EncoderModel(T5Config(vocab_size=7, d_model=32, d_kv=8, d_ff=32, num_layers=1, num_heads=2)
                       ).save_pretrained(folder / "text_encoder_2")
    return folder


def test_conditioning_from_local_text_encoders(inputs, tmp_path, monkeypatch):
    te = tiny_text_encoders(tmp_path / "flux")
    cfg = cfg_for(inputs, tmp_path / "enc", "bundle=''", f"text_encoders={str(te)!r}", "max_sequence_length=6",
                  "pairs_per_prompt=1", "save_image=false")
    G.generate_pairs(cfg)
    ds = PairDataset(tmp_path / "enc")
    items = [ds[i] for i in range(len(ds))]
    assert len({it["cond_key"] for it in items}) == 3  # one conditioning per distinct prompt
    t5 = {it["meta"]["prompt"]: it["t5"] for it in items}
    assert t5["a cat"].shape == (6, 32) and items[0]["clip_pooled"].shape == (16,)
    assert not torch.equal(t5["a cat"], t5["a dog"])
    # the same numbers as encoding the prompt directly with fluxsr_core.bundle.encode_prompt_bundle
    from fluxsr_core.bundle import encode_prompt_bundle

    enc = G.load_text_encoders(cfg, torch.float32, torch.device("cpu"))
    direct = encode_prompt_bundle("a cat", *enc, RunSettings(), max_sequence_length=6)
    assert torch.equal(direct.t5[0], t5["a cat"])
    # conditioning problems are found before the transformer loads (and encoders never share memory with it)
    from fluxsr_core import models

    monkeypatch.setattr(models, "load_models",
                        lambda *a, **k: pytest.fail("the transformer loaded before the conditioning was checked"))
    with pytest.raises(FileNotFoundError, match="text encoder not found"):
        G.generate_pairs(cfg_for(inputs, tmp_path / "none", "bundle=''", f"text_encoders={str(tmp_path)!r}"))
    with pytest.raises(ConfigError, match="no conditioning"):
        G.generate_pairs(cfg_for(inputs, tmp_path / "none2", "bundle=''"))


# --- config and CLI ---------------------------------------------------------------------------

def test_config_errors_and_cli(inputs, tmp_path, capsys):
    with pytest.raises(ConfigError, match="multiples of 16"):
        G.generate_pairs(cfg_for(inputs, tmp_path / "x", "height=40"))
    with pytest.raises(ConfigError, match="prompts is required"):
        G.generate_pairs(G.GenerateConfig(transformer="tiny", vae="tiny", output=str(tmp_path)))
    root, bundle, prompts = inputs
    args = ["pairs", "--transformer", "tiny", "--vae", "tiny", "--dtype", "fp32", "--device", "cpu",
            "--prompts", str(prompts), "--output", str(tmp_path / "cli"), "--bundle", str(bundle), "--steps", "2",
            "--height", "16", "--width", "16", "--no-save-image", "--no-progress-bar", "--no-fsync", "limit=2"]
    assert cli_main(args) == 0
    assert "wrote 2 new pairs" in capsys.readouterr().out
    assert cli_main(args[:-1]) == 0
    assert "wrote 1 new pairs" in capsys.readouterr().out and len(PairDataset(tmp_path / "cli")) == 3
    assert cli_main(["pairs", "--transformer", "tiny", "--vae", "tiny", "--output", str(tmp_path / "e")]) == 2
    assert "prompts is required" in capsys.readouterr().err
    # a second run writing the same folder under the same writer name: a message, no traceback
    from fluxsr_core.pairs import PairWriter

    with PairWriter(tmp_path / "cli", writer_id="busy-rank0", fsync=False):
        assert cli_main(args[:-1] + ["--writer-prefix", "busy"]) == 2
    err = capsys.readouterr().err
    assert "another live process is writing" in err and "--writer-prefix" in err and "Traceback" not in err


# --- memory, long prompts, disk full ----------------------------------------------------------

class LiveEmbeddings:
    """Counts the T5 embeddings in memory at once (made by the encoder, or read back from disk):
    their storages, which stay alive as long as any view of them does."""

    def __init__(self):
        import weakref

        self._storages = weakref.WeakSet()
        self.peak = self.made = 0

    @property
    def alive(self) -> int:
        return len(self._storages)

    def track(self, t5: torch.Tensor) -> None:
        self._storages.add(t5.untyped_storage())
        self.made += 1
        self.peak = max(self.peak, self.alive)


def test_conditionings_are_made_before_the_transformer_and_memory_does_not_grow_with_the_prompts(
        inputs, tmp_path, monkeypatch):
    """T5 embeddings are 4 MiB each for FLUX: a run must not hold one per prompt."""
    import itertools

    from fluxsr_core import bundle as B
    from fluxsr_core import pairs as P

    words = ["a", "cat", "dog", "bird"]
    prompts = [" ".join(c) for c in itertools.product(words, repeat=3)][:24]
    (tmp_path / "many.txt").write_text("\n".join(prompts) + "\n")
    te = tiny_text_encoders(tmp_path / "flux")
    cfg = cfg_for(inputs, tmp_path / "out", "bundle=''", f"text_encoders={str(te)!r}", "max_sequence_length=6",
                  f"prompts={str(tmp_path / 'many.txt')!r}", "pairs_per_prompt=1", "save_image=false", "steps=2",
                  "height=16", "width=16", "shard_size=4")
    live, events, alive_at_pair = LiveEmbeddings(), [], []
    encode, load_file, load_models = B.encode_prompt_bundle, P._load_conditioning_file, models.load_models

    def counted_encode(*a, **k):
        b = encode(*a, **k)
        live.track(b.t5)
        events.append("encode")
        return b

    def counted_load_file(path, key):
        t5, clip = load_file(path, key)
        live.track(t5)
        return t5, clip

    def logged_load_models(*a, **k):
        events.append("load_models")
        return load_models(*a, **k)

    monkeypatch.setattr(B, "encode_prompt_bundle", counted_encode)
    monkeypatch.setattr(P, "_load_conditioning_file", counted_load_file)
    monkeypatch.setattr(models, "load_models", logged_load_models)
    result = G.generate_pairs(cfg, on_pair=lambda pid: alive_at_pair.append(live.alive))
    monkeypatch.undo()

    assert events == ["encode"] * 24 + ["load_models"]   # all encoded (once each) before the transformer loads
    assert live.made >= 24 and live.peak <= 2            # not 24: bounded by a constant, not the prompt count
    assert 1 <= min(alive_at_pair) and max(alive_at_pair) <= 2  # the pair's own conditioning, hardly more
    # the pairs are those the in-memory conditionings gave before: same ids, conditionings, latents, metadata
    assert result.written == [pair_id(i, i) for i in range(24)]
    ds = PairDataset(tmp_path / "out")
    assert ds.ids == result.written and verify_pairs(tmp_path / "out").ok
    assert not list((tmp_path / "out").glob("*.tmp")) and len(list((tmp_path / "out").glob("cond-*"))) == 24
    from fluxsr_core.bundle import encode_prompt_bundle
    from fluxsr_core.pairs import conditioning_key

    enc = G.load_text_encoders(cfg, torch.float32, torch.device("cpu"))
    velocity = models.DiffusersVelocity(models.load_transformer("tiny", dtype="fp32", device=None, seed=5),
                                        compute_dtype=torch.float32, device=torch.device("cpu"))
    for i, prompt in enumerate(prompts):
        item = ds[ds.index_of(pair_id(i, i))]
        direct = encode_prompt_bundle(prompt, *enc, RunSettings(), max_sequence_length=6)
        assert torch.equal(item["t5"], direct.t5[0]) and torch.equal(item["clip_pooled"], direct.clip_pooled[0])
        assert item["cond_key"] == conditioning_key(direct.t5, direct.clip_pooled)
        job = G.Job(i, prompt, i)
        _, z0, _, _ = G.sample_batch(velocity, [job], {prompt: (direct.t5, direct.clip_pooled)}, cfg,
                                     torch.device("cpu"))
        assert torch.equal(item["z0"], z0[0]) and torch.equal(item["eps"], G.noise_for(i, 16, 16))
        assert (item["meta"]["prompt"], item["meta"]["prompt_index"], item["meta"]["seed"]) == (prompt, i, i)


def test_a_prompt_too_long_to_store_is_refused_before_anything_loads(inputs, tmp_path, monkeypatch):
    """A 13 MB line used to fail only after sampling, when its shard's header went past 100 MB."""
    limit = G.MAX_PROMPT_CHARS
    ok = tmp_path / "ok.txt"
    ok.write_text("x" * limit + "\n")
    assert G.read_prompts(ok) == [("x" * limit, None, 1)]               # the limit itself is accepted
    long_txt = tmp_path / "long.txt"
    long_txt.write_text("a cat\n\n" + "a photo of a cat " * 800_000 + "\n")  # 13.6 MB, stripped: 13,599,999
    long_jsonl = tmp_path / "long.jsonl"
    long_jsonl.write_text('{"prompt": "a cat"}\n\n{"prompt": "' + "y" * (limit + 1) + '"}\n')
    for m in ("load_models", "transformer_config_of"):
        monkeypatch.setattr(models, m, lambda *a, **k: pytest.fail("a model loaded before the prompts were checked"))
    monkeypatch.setattr(G, "load_text_encoders", lambda *a, **k: pytest.fail("encoders loaded first"))
    for path, n in ((long_txt, "13,599,999"), (long_jsonl, f"{limit + 1:,}")):
        out = tmp_path / f"out-{path.suffix[1:]}"
        with pytest.raises(ValueError, match=rf"{path.name} line 3: the prompt is {n} characters long, more than "
                                             rf"the {limit:,} accepted .*100 MB.*shorten the line"):
            G.generate_pairs(cfg_for(inputs, out, f"prompts={str(path)!r}"))
        assert not out.exists()                                           # nothing written


def test_disk_full_is_one_message_and_the_same_command_then_finishes(inputs, tmp_path, monkeypatch, capsys):
    import errno
    import os

    from fluxsr_core import pairs as P

    root, bundle, prompts = inputs
    out = tmp_path / "cli"
    args = ["pairs", "--transformer", "tiny", "--vae", "tiny", "--dtype", "fp32", "--device", "cpu",
            "--prompts", str(prompts), "--output", str(out), "--bundle", str(bundle), "--steps", "2", "--height", "16",
            "--width", "16", "--shard-size", "1", "--writer-prefix", "node", "--no-progress-bar", "--no-fsync"]
    write = P._write_file_durably
    shards_tried = []

    def second_shard_fills_the_disk(path, data, fsync):
        if Path(path).name.startswith("shard-"):
            shards_tried.append(Path(path).name)
            if len(shards_tried) >= 2:
                write(path, data[: len(data) // 2], fsync)                # half of it lands, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(path, data, fsync)

    monkeypatch.setattr(P, "_write_file_durably", second_shard_fills_the_disk)
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    second = out / "shard-node-rank0-000002.safetensors"
    assert err == (f"fluxsr-train pairs: error: no space left on device writing {second}; free space and run the "
                   "same command again: the finished pairs are kept\n")
    assert shards_tried == ["shard-node-rank0-000001.safetensors.tmp", "shard-node-rank0-000002.safetensors.tmp"]
    assert not list(out.glob("*.tmp")) and not second.exists()
    assert PairDataset(out).ids == [pair_id(0, 0)]                        # the finished pair is kept

    monkeypatch.undo()                                                    # space freed: the same command again
    assert cli_main(args) == 0
    assert "wrote 2 new pairs" in capsys.readouterr().out
    assert cli_main(args + [f"--output={tmp_path / 'clean'}"]) == 0       # a run the disk never stopped
    a, b = read_all(out), read_all(tmp_path / "clean")
    assert list(a) == list(b) == [pair_id(i, i) for i in range(3)] and verify_pairs(out).ok
    for k in a:
        assert torch.equal(a[k]["eps"], b[k]["eps"]) and torch.equal(a[k]["z0"], b[k]["z0"])


def test_disk_full_making_the_output_folder_or_lock_file_is_one_message(inputs, tmp_path, monkeypatch, capsys):
    import errno
    import os

    from fluxsr_core import pairs as P

    root, bundle, prompts = inputs
    out = tmp_path / "data" / "pairs"
    args = ["pairs", "--transformer", "tiny", "--vae", "tiny", "--dtype", "fp32", "--device", "cpu",
            "--prompts", str(prompts), "--output", str(out), "--bundle", str(bundle), "--steps", "2", "--height", "16",
            "--width", "16", "--writer-prefix", "node", "--no-save-image", "--no-progress-bar", "--no-fsync"]
    hint = "free space and run the same command again: the finished pairs are kept"
    mkdir = os.mkdir

    def full_at_the_output(path, *a, **k):
        if Path(path) == out:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        mkdir(path, *a, **k)

    from fluxsr_core import files  # where the writers' lock files are opened

    def open_but_no_lock_file(path, *a, **k):
        if Path(path).name.startswith(".lock-"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return open(path, *a, **k)

    for patch, failed in (((os, "mkdir", full_at_the_output), out),
                          ((files, "open", open_but_no_lock_file), out / ".lock-node-rank0")):
        monkeypatch.setattr(*patch, raising=False)
        assert cli_main(args) == 2
        assert capsys.readouterr().err == f"fluxsr-train pairs: error: no space left on device writing {failed}; {hint}\n"
        assert list(tmp_path.iterdir()) == []                            # no half-made dataset folder
        monkeypatch.undo()
    assert cli_main(args) == 0 and len(PairDataset(out)) == 3            # space freed: the same command works


def test_a_damaged_conditioning_file_is_repaired_before_the_transformer_loads(inputs, tmp_path, monkeypatch, caplog):
    """A cond file of an earlier run that is damaged used to be reused as is and fail only when
    read back for sampling, after the (12B) transformer had loaded."""
    import logging

    out = tmp_path / "run"
    G.generate_pairs(cfg_for(inputs, out, "save_image=false", "limit=2"))
    [cond] = out.glob("cond-*.safetensors")                             # one bundle: one conditioning
    data = cond.read_bytes()
    cond.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])  # same size, one byte of a tensor wrong
    load_models, found_at_load = models.load_models, []

    def checked_load_models(*a, **k):
        found_at_load.append(verify_pairs(out).ok)
        return load_models(*a, **k)

    monkeypatch.setattr(models, "load_models", checked_load_models)
    with caplog.at_level(logging.WARNING):
        result = G.generate_pairs(cfg_for(inputs, out, "save_image=false"))
    assert found_at_load == [True]                                       # repaired before the load
    assert [r.getMessage().split(" (")[0] for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"conditioning file {cond} is damaged"]
    assert len(result.written) == 4 and verify_pairs(out).ok and not list(out.glob("*.tmp"))
    assert len(read_all(out)) == 6

    # Every pair stored: a rerun restores a deleted or truncated cond file (without the transformer).
    monkeypatch.setattr(models, "load_models", lambda *a, **k: pytest.fail("nothing to sample, yet the model loaded"))
    for damage in ("deleted", "truncated"):
        if damage == "deleted":
            cond.unlink()
            with pytest.raises(PairDataError, match=rf"{cond} is missing .*: run `fluxsr-train pairs` again on {out} "
                                                    "with the same prompts and settings"):
                PairDataset(out)[0]
        else:
            cond.write_bytes(cond.read_bytes()[:100])
        assert not verify_pairs(out).ok
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            assert G.generate_pairs(cfg_for(inputs, out, "save_image=false")).written == []
        assert verify_pairs(out).ok, damage
        assert [r.getMessage().split(" (")[0] for r in caplog.records if r.levelno >= logging.WARNING] == [
            f"conditioning file {cond.name}, needed by stored pairs of line 1 of {inputs[2]}, is not usable"] + (
            [f"conditioning file {cond} is damaged"] if damage == "truncated" else [])   # and then replaced
    # Wrong bytes of the right size are found in full when read: the message says what to do, which works.
    data = cond.read_bytes()
    cond.write_bytes(data[:-3] + bytes([data[-3] ^ 0xFF]) + data[-2:])
    with pytest.raises(PairDataError) as info:
        PairDataset(out)[0]
    assert str(info.value).startswith(f"conditioning file {cond} is damaged (its content does not hash to ")
    assert str(info.value).endswith(f"delete it and run `fluxsr-train pairs` again on {out} with the same prompts and "
                                    "settings, which encodes the prompt again and stores it (the pairs are kept)")
    cond.unlink()
    G.generate_pairs(cfg_for(inputs, out, "save_image=false"))
    assert verify_pairs(out).ok and len(read_all(out)) == 6
