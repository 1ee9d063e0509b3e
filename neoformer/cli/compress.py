"""`neoformer compress TEACHER --out DIR`: reduce a trained decoder and distill it (docs/compress.md)."""
from __future__ import annotations

import argparse
import contextlib
import shutil
from pathlib import Path

from ..config import ConfigError
from .train import threads_arg

EXAMPLES = """Examples:
  neoformer compress runs/teacher --out runs/half --layers every-2nd --distill-steps 300
  neoformer compress runs/teacher --out runs/slim --width 0.5 --ffn-dim 256 --heads 4 --by importance
  neoformer compress runs/teacher --out runs/nano --recipe nexus-nano --baseline-scratch
  neoformer compress runs/teacher --out runs/half --resume             # continue the distillation
  neoformer compress runs/teacher --out runs/w50 --width 0.5 --logit-cache runs/logits   # reusable teacher logits"""


def add_parser(subparsers) -> None:
    text = "compress a trained decoder: fewer layers, heads, FFN neurons, channels or tokens, then distillation"
    p = subparsers.add_parser("compress", help=text, description=text + ".", epilog=EXAMPLES, allow_abbrev=False,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher", metavar="TEACHER_CKPT", help="checkpoint or run directory of the teacher")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory of the student")
    p.add_argument("--recipe", choices=("nexus-standard", "nexus-nano"),
                   help="the seed's base -> Standard / Nano ratios applied to this teacher (explicit flags win)")
    what = p.add_argument_group("what to remove")
    what.add_argument("--layers", metavar="SPEC", help="every-3rd | every-k=3 | keep=0,3,6 | N (a count, see --by)")
    what.add_argument("--by", choices=("importance", "uniform"), default="importance",
                      help="how a count of layers / heads is chosen (default importance)")
    what.add_argument("--layer-score", choices=("influence", "skip-loss"), default="influence",
                      help="importance of a block: ShortGPT Block Influence or the loss increase when skipped")
    what.add_argument("--d-model", type=int, metavar="N", help="student width")
    what.add_argument("--width", type=float, metavar="FRACTION", help="student width as a fraction of the teacher's")
    what.add_argument("--width-method", choices=("pca", "channels"), default="pca",
                      help="pca = SliceGPT rotation (default), channels = Minitron activation importance")
    what.add_argument("--ffn-dim", type=int, metavar="N", help="FFN hidden neurons kept per layer (by importance)")
    what.add_argument("--heads", type=int, metavar="N", help="attention (query) heads per layer")
    what.add_argument("--head-score", choices=("gradient", "entropy"), default="gradient",
                      help="head importance: Michel et al. gradient (default) or attention entropy")
    what.add_argument("--kv-heads", type=int, metavar="N", help="KV heads (GQA groups) kept; default the teacher's")
    what.add_argument("--vocab", type=int, metavar="K", help="tokens kept (most frequent on --data, plus specials "
                      "and all single bytes)")
    kd = p.add_argument_group("distillation")
    kd.add_argument("--distill-steps", type=int, default=200, metavar="N", help="optimizer steps (default 200; 0 = none)")
    kd.add_argument("--distill-tokens", type=int, metavar="N", help="stop after this many training tokens")
    kd.add_argument("--alpha", type=float, default=0.5, help="weight of the KD term (default 0.5)")
    kd.add_argument("--temperature", type=float, default=2.0, help="softmax temperature (default 2)")
    kd.add_argument("--hidden-weight", type=float, default=0.0, help="weight of a final hidden-state MSE "
                    "(students as wide as the teacher)")
    kd.add_argument("--teacher-bf16", action="store_true", help="run the teacher in bf16")
    kd.add_argument("--logit-cache", metavar="DIR", help="store the teacher's top-k logits here (safetensors) and "
                    "distill from them; a later run with the same teacher and data reuses them")
    kd.add_argument("--logit-top-k", type=int, default=64, metavar="K",
                    help="teacher logits kept per position in --logit-cache (default 64; the teacher is "
                    "renormalised over them)")
    kd.add_argument("--calibration-batches", type=int, default=8, metavar="N",
                    help="batches that score layers / heads / channels (default 8)")
    kd.add_argument("--baseline-scratch", action="store_true",
                    help="also train the student's shape from scratch on the same token budget")
    run = p.add_argument_group("data and run (as in neoformer train)")
    run.add_argument("--data", metavar="SPEC", help="data source (default: the teacher's)")
    run.add_argument("--batch", type=int, help="sequences per micro-batch")
    run.add_argument("--seq", type=int, help="tokens per sequence")
    run.add_argument("--lr", type=float, help="peak learning rate (default 1e-3)")
    run.add_argument("--seed", type=int)
    run.add_argument("--eval-every", type=int, metavar="STEPS")
    run.add_argument("--save-every", type=int, metavar="STEPS")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"))
    run.add_argument("--threads", type=threads_arg, metavar="N|auto")
    run.add_argument("--device", choices=("cpu", "cuda", "mps"), default="cpu")
    run.add_argument("--resume", action="store_true", help="continue the distillation in --out")
    run.add_argument("--overwrite", action="store_true", help="replace a previous run in --out")
    p.set_defaults(func=run_compress)


def _plan(args, teacher_cfg):
    from ..compress import CompressPlan, recipe_plan

    explicit = {name: getattr(args, name) for name in ("layers", "d_model", "width", "ffn_dim", "heads", "kv_heads",
                                                       "vocab") if getattr(args, name) is not None}
    choices = dict(by=args.by, layer_score=args.layer_score, head_score=args.head_score,
                   width_method=args.width_method)
    if args.recipe:
        base = recipe_plan(args.recipe, teacher_cfg, **choices).to_dict()
        if "width" in explicit:
            base["d_model"] = None
        return CompressPlan(**{**base, **explicit})
    return CompressPlan(**explicit, **choices)


def _settings(args, saved: dict):
    from ..compress import DistillConfig
    from ..train.run_config import DataConfig, TrainConfig

    steps = args.distill_steps
    if steps < 0:
        raise ConfigError(f"--distill-steps ({steps}) must be >= 0")
    teacher_train = saved.get("train") or {}
    train = dict(max_steps=steps, max_tokens=args.distill_tokens, lr=args.lr or 1e-3,
                 batch_size=args.batch or teacher_train.get("batch_size", 16),
                 seq_len=args.seq or teacher_train.get("seq_len"), eval_every=args.eval_every or 0,
                 save_every=args.save_every if args.save_every is not None else 100, samples=0,
                 eval_batches=teacher_train.get("eval_batches", 20), warmup_steps=min(50, max(steps // 10, 0)),
                 seed=args.seed if args.seed is not None else 0, threads=args.threads or "auto")
    if args.precision:
        train["precision"] = args.precision
    data = dict(saved.get("data") or {})
    if args.data:
        data["source"] = args.data
    return DistillConfig(alpha=args.alpha, temperature=args.temperature, hidden_weight=args.hidden_weight,
                         teacher_bf16=args.teacher_bf16, calibration_batches=args.calibration_batches,
                         logit_cache=args.logit_cache, logit_top_k=args.logit_top_k,
                         train=TrainConfig(**train), data=DataConfig.from_dict(data))


def run_compress(args: argparse.Namespace) -> int:
    from ..checkpoint import read_config, resolve_checkpoint
    from ..checkpoint.rundir import RunLock, prepare_run_folder
    from ..compress import compress
    from ..compress.pipeline import PRUNED_DIR, SCRATCH_DIR
    from ..config import ModelConfig

    saved = read_config(resolve_checkpoint(args.teacher))
    if saved.get("model") is None:
        raise ConfigError(f"{args.teacher} records no model config")
    plan = _plan(args, ModelConfig.from_dict(saved["model"]))
    settings = _settings(args, saved)
    if args.calibration_batches < 1:
        raise ConfigError(f"--calibration-batches ({args.calibration_batches}) must be positive")
    out = Path(args.out)
    if args.resume and args.overwrite:
        raise ConfigError("--overwrite replaces a run and --resume continues it; pass one of them")
    if args.resume and not (out / PRUNED_DIR / "latest").exists():
        raise ConfigError(f"{out} holds no compression to resume; run without --resume first")
    with contextlib.ExitStack() as cleanup:
        prepare_run_folder(out, resume=args.resume, overwrite=args.overwrite)
        cleanup.callback(RunLock(out).acquire().release)
        if args.overwrite:  # derived from the teacher: recomputed below
            for name in (PRUNED_DIR, SCRATCH_DIR):
                shutil.rmtree(out / name, ignore_errors=True)
        import yaml

        (out / "config.yaml").write_text(yaml.safe_dump({"compress": plan.to_dict(), "teacher": str(args.teacher),
                                                         "train": settings.train.to_dict()}, sort_keys=False))
        report = compress(args.teacher, out, plan, settings, resume=args.resume,
                          baseline_scratch=args.baseline_scratch, device=args.device)
    return {"interrupted": 130, "terminated": 143}.get(report.get("stop_reason"), 0)


__all__ = ["add_parser", "run_compress"]
