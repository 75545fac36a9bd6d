"""ADL forms compared on the demo model: ``python bench/adl_forms_demo.py --work DIR --out DIR``.

Trains the demo student again from a finished demo work folder (``python -m fluxsr_training.demo
--work DIR``: its VAE, teacher, conditioning and pairs are reused, nothing there is changed) once
per variant, each with the demo recipe's settings except the ADL term:

* ``none``: no ADL;
* ``tokens``: the token-feature form (``loss.adl_form=tokens``);
* ``attention``: the attention-map form (``loss.adl_form=attention``),

both forms at the same weight (``--w-adl``). Each student is exported and scored by the demo's own
report (PSNR-Y/SSIM-Y/ST-LPIPS through ``fluxsr upscale`` on the held-out photos), plus the
**token-grid error**: the part of the output's error (Y, 8-bit levels) that repeats with the
period of one transformer token (16 output pixels: 8x VAE times 2x2 patches). It is the RMS of
the error averaged over all 16x16 cells at each position in the cell, the pattern a periodic
grid artefact leaves; independent noise averages out of it. Writes ``adl_forms.json`` and
``adl_forms.md`` into ``--out``. A figure from a tiny model on CPU, not from FLUX.1-dev.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np

TOKEN_PX = 16   # output pixels per transformer token: 8 (VAE) x 2 (patch)


def token_grid_error(output: np.ndarray, reference: np.ndarray, period: int = TOKEN_PX) -> float:
    """RMS (8-bit levels) of the Y error's mean over all ``period``-pixel cells, per cell position."""
    from fluxsr_training.evaluate import rgb_to_y

    h = min(output.shape[0], reference.shape[0]) // period * period
    w = min(output.shape[1], reference.shape[1]) // period * period
    err = rgb_to_y(output[:h, :w]).astype(np.float64) - rgb_to_y(reference[:h, :w]).astype(np.float64)
    cells = err.reshape(h // period, period, w // period, period)
    pattern = cells.mean(axis=(0, 2))
    pattern -= pattern.mean()    # a uniform offset is brightness, not a grid
    return float(np.sqrt((pattern ** 2).mean()))


def grid_errors(folder: Path, hr: dict[str, np.ndarray]) -> dict[str, float]:
    from fluxsr_training.evaluate import read_image_8bit

    return {name: round(token_grid_error(read_image_8bit(folder / f"{name}.png"), img), 3)
            for name, img in hr.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True, help="a finished demo work folder (stages.json, pairs/)")
    p.add_argument("--out", type=Path, required=True, help="where the students, reports and tables go")
    p.add_argument("--w-adl", type=float, default=0.05, help="the ADL weight of both forms (demo: 0.001)")
    p.add_argument("--steps", type=int, default=None, help="student steps (default: the demo's)")
    p.add_argument("--variants", default="none,tokens,attention")
    p.add_argument("--queries", type=int, default=None,
                   help="attention form: queries per sample (default: loss.adl_queries', 256, more than the "
                        "demo's 144 image tokens, so all of them)")
    p.add_argument("--seed", type=int, default=None, help="the student's seed (LoRA init, data order; default: the demo's)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)

    import torch

    from fluxsr_core import demo_model as D
    from fluxsr_training import demo
    from fluxsr_training import trainer as T
    from fluxsr_training.export import export_student

    if args.threads:
        torch.set_num_threads(args.threads)
    if not (args.work / "stages.json").exists() or not (args.work / "pairs").is_dir():
        p.error(f"{args.work} is not a finished demo work folder (run python -m fluxsr_training.demo first)")
    cfg = demo.DemoConfig.full()
    if args.steps:
        cfg = dataclasses.replace(cfg, student_steps=args.steps)
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    recipe = demo.Recipe(cfg, args.out / "unused-out", args.work, None, quick=False)
    hr = demo.holdout_images(cfg)
    results_path = args.out / "adl_forms.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        sampled = variant == "attention" and args.queries is not None
        key = f"{variant}@{0 if variant == 'none' else args.w_adl:g}x{cfg.student_steps}" + \
            (f"-q{args.queries}" if sampled else "") + (f"-seed{cfg.seed}" if args.seed is not None else "")
        if key in results:
            print(f"{key}: done before, kept")
            continue
        base = recipe.train_config()
        loss = dataclasses.replace(base.loss, w_adl=0.0 if variant == "none" else args.w_adl,
                                   adl_form="tokens" if variant == "none" else variant,
                                   adl_queries=args.queries if sampled else base.loss.adl_queries)
        vdir = args.out / key.replace("@", "-")
        if vdir.exists():
            shutil.rmtree(vdir)
        tcfg = dataclasses.replace(base, loss=loss, train=dataclasses.replace(base.train, output_dir=str(vdir / "student")))
        t0 = time.time()
        trained = T.train(tcfg)
        seconds = time.time() - t0
        out = vdir / "out"
        res = export_student(vdir / "student", vdir / "export", use_ema=True, lora_name=D.LORA_FILE,
                             bundle_name=D.CONDITIONING_FILE)
        out.mkdir(parents=True)
        for src, name in ((Path(res.lora_path), D.LORA_FILE), (Path(res.bundle_path), D.CONDITIONING_FILE),
                          (recipe.teacher_path, D.TRANSFORMER_FILE), (recipe.vae_path, D.VAE_FILE)):
            shutil.copyfile(src, out / name)
        report = demo.make_report(out, vdir / "report", cfg, print)
        row = {}
        for kind, r in report["lr_kinds"].items():
            means = {m["name"]: m["mean"] for m in r["table"]["rows"]}
            row[kind] = {"trained": means[demo.ROW_TRAINED],
                         "grid_trained": grid_errors(vdir / "report" / f"trained-{kind}", hr),
                         "grid_untrained": grid_errors(vdir / "report" / f"untrained-{kind}", hr)}
        adl_last = [h.get("adl") for h in trained.history if "adl" in h]
        results[key] = {"variant": variant, "w_adl": loss.w_adl, "steps": cfg.student_steps, "seed": cfg.seed,
                        "queries": loss.adl_queries if variant == "attention" else None,
                        "image_tokens": (cfg.pair_size // TOKEN_PX) ** 2,  # of a training crop
                        "train_seconds": round(seconds, 1), "adl_first_last": adl_last[:1] + adl_last[-1:],
                        "lr_kinds": row}
        results_path.write_text(json.dumps(results, indent=1))
        print(f"{key}: " + json.dumps(row["bicubic"]["trained"]), flush=True)
    photos = ", ".join(demo.HOLDOUT)
    lines = [f"| ADL | steps | LR | PSNR-Y | SSIM-Y | ST-LPIPS | token-grid error, levels ({photos}) |",
             "|---|---|---|---|---|---|---|"]
    for r in results.values():
        label = ("none" if r["variant"] == "none" else f"{r['variant']}, w_adl {r['w_adl']:g}") + \
            (f", {r['queries']} queries" if r.get("queries") and r["queries"] < r["image_tokens"] else "") + \
            (f", seed {r['seed']}" if "seed" in r else "")
        for kind, k in r["lr_kinds"].items():
            t = k["trained"]
            grid = ", ".join(f"{v:.2f}" for v in k["grid_trained"].values())
            lines.append(f"| {label} | {r['steps']} | {kind} | {t['psnr_y']:.2f} | {t['ssim_y']:.4f} | "
                         f"{t.get('stlpips', float('nan')):.4f} | {grid} |")
    (args.out / "adl_forms.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
