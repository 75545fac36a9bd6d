"""``fluxsr-train``: teacher pairs, distillation, export (and the evaluation / demo recipes).

    fluxsr-train pairs  --transformer flux1-dev.safetensors --vae ae.safetensors \\
                        --prompts prompts.txt --output pairs/ --bundle cond.safetensors
    fluxsr-train bundle --prompt "a photo" --text-encoders /models/flux -o student_bundle.safetensors
    fluxsr-train verify pairs/ [--drop-bad]
    fluxsr-train train  --config train_default.toml model.transformer=... data.pairs=pairs/ [--resume latest]
    fluxsr-train export runs/fluxsr -o student/
    accelerate launch --multi_gpu --num_processes 8 -m fluxsr_training.cli train --config ...

``train`` and ``pairs`` read a TOML config (``--config``: a path, or the name of a config shipped
in ``fluxsr_training/configs`` such as ``train_tiny``) and then ``section.key=value`` overrides.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Optional, Sequence

from fluxsr_core.dependencies import refuse_outdated

from .config_io import shipped_config

log = logging.getLogger("fluxsr.train")


def _config_path(value: Optional[str]) -> Optional[Path]:
    if not value:
        return None
    p = Path(value)
    return p if p.is_file() else shipped_config(value)


def _unlayered_config_note(path: Optional[Path]) -> Optional[str]:
    """For a user's config that extends nothing: the train_default settings it leaves to the
    built-in defaults, which differ (no gradient checkpointing, no held-out pairs, ...), or None."""
    from . import config_io
    from .trainer import TrainConfig

    if path is None or path.resolve().parent == config_io.SHIPPED_CONFIGS:
        return None
    own = config_io.load_toml(path)
    if config_io.EXTENDS_KEY in own:
        return None
    default = config_io.to_dict(config_io.from_dict(TrainConfig, config_io.load_toml(
        config_io.shipped_config("train_default"))))
    builtin = config_io.to_dict(TrainConfig())
    left = [f"{sec}.{key} {builtin[sec].get(key)!r} (train_default: {value!r})"
            for sec, table in default.items() if isinstance(table, dict)
            for key, value in table.items()
            if key not in (own.get(sec) or {}) and builtin.get(sec, {}).get(key) != value]
    if not left:
        return None
    return (f"{path} extends no config, so the {len(left)} settings it leaves out that train_default sets otherwise "
            f"take the built-in defaults: {'; '.join(left[:6])}{'; ...' if len(left) > 6 else ''}. To start from "
            f"train_default instead, put  {config_io.EXTENDS_KEY} = \"train_default\"  at the top of the file")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s", stream=sys.stdout,
                        force=True)
    # accelerate logs every file of a checkpoint at INFO; our own line says where it went.
    for name in ("accelerate", "accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.WARNING)


# --- pairs ---------------------------------------------------------------------------------

def _add_dataclass_flags(parser: argparse.ArgumentParser, cls) -> list[str]:
    """One ``--flag`` per field of ``cls`` (default None: unset flags leave the config alone)."""
    from .config_io import _unwrap_optional  # noqa: PLC2701 - same package

    names = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        tp, _ = _unwrap_optional(hints[f.name])
        doc = f"(default {f.default!r})" if f.default is not dataclasses.MISSING else ""
        if tp is bool:
            parser.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction, help=doc)
        else:
            parser.add_argument(flag, dest=f.name, default=None, metavar=f.name.upper(), help=doc)
        names.append(f.name)
    return names


def _cmd_pairs(args, fields: list[str]) -> int:
    from .generate import generate_pairs, load_generate_config

    overrides = list(args.overrides)
    for name in fields:
        v = getattr(args, name)
        if v is not None:
            overrides.append(f"{name}={str(v).lower() if isinstance(v, bool) else _quote(v)}")
    cfg = load_generate_config(_config_path(args.config), overrides)
    r = generate_pairs(cfg)
    others = f"; {len(r.made_by_others)} were stored meanwhile by another writer" if r.made_by_others else ""
    print(f"pairs: rank {r.rank}/{r.world} wrote {len(r.written)} new pairs to {r.output} "
          f"({r.skipped} were already there{others}){'; stopped at --limit' if r.stopped_by_limit else ''}")
    return 0


def _cmd_bundle(args) -> int:
    from .generate import read_single_prompt, write_student_bundle

    prompt = read_single_prompt(args.prompt_file) if args.prompt_file else args.prompt
    try:
        r = write_student_bundle(args.output, prompt, text_encoders=args.text_encoders, clip=args.clip, t5=args.t5,
                                 max_sequence_length=args.max_sequence_length, guidance=args.guidance, t_l=args.t_l,
                                 scale=args.scale, dtype=args.dtype, device=args.device, overwrite=args.overwrite)
    except KeyboardInterrupt:  # nothing is half-written: the file appears whole or not at all
        print(f"fluxsr-train bundle: interrupted; {args.output} was not written", file=sys.stderr)
        return 130
    shown = r.prompt if len(r.prompt) <= 80 else r.prompt[:77] + "..."
    print(f"bundle: wrote {r.path} from the prompt {shown!r}: t5 {list(r.t5_shape)}, clip_pooled "
          f"{list(r.clip_shape)} ({r.dtype})")
    for note in r.notes:
        print(f"  note: {note}")
    print(f"  run settings in its metadata: T_L={r.settings.t_l:g}, guidance={r.settings.guidance:g}, "
          f"scale={r.settings.scale:g}")
    print(f"train the student with it: fluxsr-train train ... data.conditioning={r.path}")
    return 0


def _cmd_verify(args) -> int:
    from fluxsr_core.pairs import KEPT_ON_DROP_KINDS, drop_bad_shards, verify_pairs

    report = verify_pairs(args.folder)
    print(report)
    if report.ok and not report.pairs:  # nothing to train on is no usable dataset (a wrong folder?)
        print(f"verify: {args.folder} holds no pairs (no manifest-*.jsonl lists any): not a pair dataset, or not yet; "
              "check the folder, or make pairs into it with `fluxsr-train pairs --output` (or the ComfyUI Teacher "
              "Sampler)")
        return 1
    if report.ok:
        print(f"verify: {args.folder} is usable" + (" (the notes are harmless)" if report.notes else ""))
        return 0
    if not args.drop_bad:
        print(f"verify: {len(report.errors)} errors. `fluxsr-train verify {args.folder} --drop-bad` sets the bad "
              "shards aside (their pairs leave the dataset; `fluxsr-train pairs` makes them again)")
        unreadable = [p for p in report.errors if p.kind in KEPT_ON_DROP_KINDS]
        if unreadable:
            print(f"  {len(unreadable)} of them could not be read from disk ({', '.join(KEPT_ON_DROP_KINDS)}): "
                  "--drop-bad leaves those in place, as they may be whole; fix their permissions or the disk "
                  "and verify again")
        return 1
    try:
        dropped = drop_bad_shards(args.folder, report)
    except OSError as exc:  # e.g. a read-only folder: nothing is half-done (moves first, then the manifest)
        print(f"fluxsr-train verify: error: could not set the bad shards aside: {exc}", file=sys.stderr)
        return 2
    print(dropped)
    after = verify_pairs(args.folder, check_hash=False)  # the shards kept were hashed above
    if after.ok:
        print(f"verify: {args.folder} is usable now; run `fluxsr-train pairs` with the same arguments as before to "
              f"make the {dropped.pairs_dropped} dropped pairs again (or train on the {after.pairs} left)")
        return 0
    print("verify: still not usable:")
    for problem in after.errors:
        print(f"  {problem}")
    if any(p.kind in ("missing-cond", "bad-cond") for p in after.errors):
        print("  a missing conditioning file is stored again by `fluxsr-train pairs` with the same arguments")
    return 1


def _quote(v) -> str:
    """A flag value as an override value: kept as a plain string unless it is a TOML number/bool."""
    from .config_io import parse_override_value

    parsed = parse_override_value(str(v))
    if isinstance(parsed, (int, float, bool)) or str(v).startswith(("[", '"')):
        return str(v)
    import json

    return json.dumps(str(v), ensure_ascii=False)  # TOML takes no \ud83d-style surrogate escapes (an emoji path)


# --- train ---------------------------------------------------------------------------------

def _main_process() -> bool:
    """Whether this is the job's main process (RANK 0, or no launcher)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


def _cmd_train(args) -> int:
    from .trainer import load_train_config, train

    overrides = list(args.overrides)
    if args.resume is not None and "=" in args.resume and not Path(args.resume).exists():
        # `--resume a.b=c`: argparse gave the first override to the optional value.
        overrides.insert(0, args.resume)
        args.resume = "latest"
    if args.resume is not None:
        overrides.append(f"train.resume={_quote(args.resume)}")
    config_path = _config_path(args.config)
    cfg = load_train_config(config_path, overrides)
    note = _unlayered_config_note(config_path) if _main_process() else None
    if note:
        print(f"fluxsr-train train: note: {note}", file=sys.stderr)
    if args.print_config:
        from . import config_io
        from .trainer import check_config, config_warnings

        sys.stdout.write(config_io.dump_toml(config_io.to_dict(cfg)))
        # The value checks a run makes first, said (on stderr, so the printed TOML stays usable)
        # but not fatal: an incomplete config is a fair template to fill in.
        try:
            check_config(cfg)
        except config_io.ConfigError as exc:
            print(f"fluxsr-train train: note: as it stands, a run of this config is refused: {exc}", file=sys.stderr)
        else:
            for warning in config_warnings(cfg):
                print(f"fluxsr-train train: note: {warning}", file=sys.stderr)
        return 0
    try:
        r = train(cfg)
    except KeyboardInterrupt as exc:
        # Ctrl-C: say what was kept and the exact way on (a rerun without --resume is refused)
        from .trainer import TrainingInterrupted, interrupted_advice, latest_checkpoint

        advice = exc.advice() if isinstance(exc, TrainingInterrupted) else \
            interrupted_advice(latest_checkpoint(cfg.train.output_dir))
        if _main_process():  # the launcher forwards Ctrl-C to every process: one advice per job
            print(f"fluxsr-train train: {advice}", file=sys.stderr)
        return 143 if getattr(exc, "terminated", False) else 130
    if not _main_process():
        return 0  # one summary per job, from the main process
    if r.step > r.start_step or r.checkpoint:
        last = r.history[-1] if r.history else {}
        val = ""
        if r.validation:  # the last validation may be older than the last step: name its step
            v = r.validation[-1]
            val = f", validation PSNR {v['psnr']:.2f} dB at step {v['step']}" + \
                (" (before training)" if v["step"] == 0 and r.step > 0 else "")
        print(f"train: step {r.step}/{cfg.train.max_steps}{' (stopped early)' if r.stopped_early else ''}, "
              f"loss {last.get('loss', float('nan')):.4g}{val}; checkpoint {r.checkpoint}")
        if r.conditioning_path is None:  # trained on several conditionings: export needs the one to ship
            print(f"export with: fluxsr-train export {r.output_dir} -o <folder> --bundle <bundle.safetensors> "
                  "(the run trained on several conditionings: give the one the student should run with, "
                  "e.g. one of the pairs folder's cond-*.safetensors)")
        else:
            print(f"export with: fluxsr-train export {r.output_dir} -o <folder>")
    return 0


# --- export --------------------------------------------------------------------------------

def _cmd_export(args) -> int:
    from .export import export_student

    r = export_student(args.checkpoint, args.output, use_ema=args.ema, bundle=args.bundle, overwrite=args.overwrite)
    print(f"export: step {r.step} ({'EMA' if r.ema else 'raw'} weights, rank {r.rank}, alpha {r.alpha:g})")
    print(f"  LoRA:   {r.lora_path}")
    print(f"  bundle: {r.bundle_path}")
    print(f"  {r.settings.describe()}")
    print(f"run with: fluxsr upscale IMAGE -o OUT --lora {r.lora_path} --conditioning {r.bundle_path} ...")
    return 0


# --- delegated -----------------------------------------------------------------------------

def _delegate(module: str, argv: Sequence[str]) -> int:
    import importlib

    try:
        mod = importlib.import_module(f"fluxsr_training.{module}")
    except ModuleNotFoundError as exc:
        if exc.name == f"fluxsr_training.{module}":
            raise SystemExit(f"fluxsr-train {module}: fluxsr_training.{module} is not installed") from None
        raise
    main_fn = getattr(mod, "main", None)
    if main_fn is None:
        raise SystemExit(f"fluxsr-train: fluxsr_training.{module} has no main(argv)")
    return int(main_fn(list(argv)) or 0)


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    from .generate import GenerateConfig

    p = argparse.ArgumentParser(prog="fluxsr-train", description="FluxSR training: teacher pairs, distillation, "
                                "export, evaluation and the demo recipe.",
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging and full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    pp = sub.add_parser("pairs", help="sample teacher (noise, latent) pairs into a pair-dataset folder")
    pp.add_argument("--config", help="TOML config (path or shipped name); flags and overrides win")
    fields = _add_dataclass_flags(pp, GenerateConfig)
    pp.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    from fluxsr_core.settings import DEFAULT_GUIDANCE, DEFAULT_SCALE, DEFAULT_T_L

    pb = sub.add_parser("bundle", help="encode the student's one fixed prompt into a conditioning bundle "
                        "(for train's data.conditioning)")
    which = pb.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", help="the prompt the student runs with")
    which.add_argument("--prompt-file", help="a .txt or .jsonl file holding that one prompt")
    pb.add_argument("--text-encoders", default="", help="FLUX.1-dev folder with text_encoder/ and text_encoder_2/ "
                    "(as for pairs)")
    pb.add_argument("--clip", default="", help="CLIP-L folder (model and tokenizer), instead of --text-encoders")
    pb.add_argument("--t5", default="", help="T5-XXL folder (model and tokenizer), instead of --text-encoders")
    pb.add_argument("--max-sequence-length", type=int, default=512, help="T5 tokens (default 512)")
    pb.add_argument("--guidance", type=float, default=DEFAULT_GUIDANCE, help=f"(default {DEFAULT_GUIDANCE:g})")
    pb.add_argument("--t-l", type=float, default=DEFAULT_T_L, help=f"the student's T_L (default {DEFAULT_T_L:g})")
    pb.add_argument("--scale", type=float, default=DEFAULT_SCALE, help=f"(default {DEFAULT_SCALE:g})")
    pb.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU, as pairs), bf16, fp16, fp32")
    pb.add_argument("--device", default="auto")
    pb.add_argument("-o", "--output", required=True, help="the bundle file to write (.safetensors)")
    pb.add_argument("--overwrite", action="store_true", help="replace an existing output file")

    pv = sub.add_parser("verify", help="check a pair-dataset folder; --drop-bad sets damaged shards aside")
    pv.add_argument("folder", help="the pair-dataset folder (pairs --output)")
    pv.add_argument("--drop-bad", action="store_true",
                    help="take the damaged, missing or conflicting shards out of their writers' manifests and move "
                         "their files to <folder>/quarantine/, so pairs makes them again and train runs")

    pt = sub.add_parser("train", help="distil the one-step student (FTD + MSE + TV-LPIPS + ADL)")
    # The shipped defaults by default: the values the README documents (the dataclasses' own
    # defaults are the Python API's and differ, e.g. no accumulation, no held-out pairs).
    pt.add_argument("--config", default="train_default",
                    help="TOML config (path, or a shipped name: train_default (the default), train_tiny)")
    pt.add_argument("--resume", nargs="?", const="latest", default=None,
                    help="continue from the newest checkpoint of train.output_dir (no value / 'latest') or a "
                         "checkpoint folder")
    pt.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    pt.add_argument("overrides", nargs="*", metavar="section.key=value",
                    help="config overrides, e.g. optim.lr=5e-5 data.pairs=/data/pairs")

    pe = sub.add_parser("export", help="write the student LoRA + conditioning bundle for fluxsr/ComfyUI")
    pe.add_argument("checkpoint", help="a training output_dir (its newest checkpoint) or a checkpoint folder")
    pe.add_argument("-o", "--output", required=True, help="folder for the exported files")
    pe.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                    help="export the EMA weights (default: when the run kept them)")
    pe.add_argument("--bundle", help="ship this conditioning bundle instead of the run's own")
    pe.add_argument("--overwrite", action="store_true", help="replace the files of an earlier export in the folder")

    for name, text in (("eval", "PSNR/SSIM/LPIPS/... tables of outputs against references"),
                       ("demo", "rebuild the shipped demo model (the committed recipe)")):
        sd = sub.add_parser(name, help=text, add_help=False)
        sd.add_argument("rest", nargs=argparse.REMAINDER)
    return p, fields


def _user_message(exc: BaseException) -> str:
    """The error's own message; for one re-raised from a DataLoader worker ("Caught ValueError in
    DataLoader worker process 0. Original Traceback ..."), the original's last line; a busy
    writer name with the option that gives another."""
    from fluxsr_core.pairs import WriterBusyError

    text = str(exc).strip()
    if isinstance(exc, WriterBusyError):  # two runs writing one folder under the same name
        return f"{text} (fluxsr-train pairs: --writer-prefix)"
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1]
        return last.split(": ", 1)[1] if ": " in last else last
    return text


def _os_message(exc: BaseException) -> str:
    """An OSError as "what, on which path" (its own text names the path only in its repr)."""
    if isinstance(exc, OSError) and exc.strerror and exc.filename:
        return f"{exc.strerror}: {exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
    return _user_message(exc)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``fluxsr-train``; returns the exit status. In a process of a multi-process
    launch it ends the process with it (:func:`fluxsr_training.trainer.exit_without_teardown`:
    torch's teardown at interpreter exit aborted some completed two-process runs)."""
    code = _main(argv)
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        from .trainer import exit_without_teardown

        exit_without_teardown(code)
    return code


def _main(argv: Optional[Sequence[str]] = None) -> int:
    from fluxsr_core.files import tolerate_unencodable_console

    tolerate_unencodable_console()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("eval", "demo"):
        # Their own parsers (help included) live in fluxsr_training.evaluate / .demo.
        _setup_logging(False)
        if refuse_outdated(f"fluxsr-train {argv[0]}"):
            return 2
        return _delegate({"eval": "evaluate", "demo": "demo"}[argv[0]], argv[1:])
    parser, fields = build_parser()
    args, rest = parser.parse_known_args(argv)
    # Overrides may stand on both sides of an option (`... data.pairs=P --resume latest x.y=z`):
    # argparse takes the positionals of one stretch only and leaves the later ones over.
    late = [a for a in rest if "=" in a and not a.startswith("-")]
    if late and hasattr(args, "overrides"):
        args.overrides = list(args.overrides) + late
    unknown = [a for a in rest if a not in late or not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    _setup_logging(args.verbose)
    if refuse_outdated(f"fluxsr-train {args.command}"):
        return 2
    if args.command in ("eval", "demo"):
        return _delegate({"eval": "evaluate", "demo": "demo"}[args.command], args.rest)
    from fluxsr_core.pairs import WriterBusyError

    from .config_io import ConfigError
    from .trainer import OtherProcessError  # costs no more than the pairs import above (torch)

    try:
        if args.command == "pairs":
            return _cmd_pairs(args, fields)
        if args.command == "bundle":
            return _cmd_bundle(args)
        if args.command == "verify":
            return _cmd_verify(args)
        if args.command == "train":
            return _cmd_train(args)
        return _cmd_export(args)
    except (ConfigError, FileNotFoundError, ValueError, WriterBusyError, OtherProcessError) as exc:
        if args.verbose:
            raise
        print(f"fluxsr-train {args.command}: error: {_user_message(exc)}", file=sys.stderr)
        return 2
    except (OSError, FloatingPointError) as exc:  # a folder that cannot be written, a loss gone NaN
        if args.verbose:
            raise
        print(f"fluxsr-train {args.command}: error: {_os_message(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"fluxsr-train {args.command}: interrupted; rerun with the same arguments to continue "
              f"({'--resume' if args.command == 'train' else 'pairs already written are kept'})", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover - `python -m fluxsr_training.cli`
    sys.exit(main())
