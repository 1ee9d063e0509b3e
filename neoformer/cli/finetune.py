"""`neoformer finetune`: LoRA / QLoRA / full fine-tuning, merging adapters, peft files."""
from __future__ import annotations

import argparse

from .train import EXIT_INTERRUPTED, threads_arg

ACTIONS = {
    "merge": "fold an adapter into its base: a normal checkpoint at --out",
    "export-peft": "write peft's adapter_config.json + adapter_model.safetensors to --out",
    "import-peft": "a neoformer adapter checkpoint at --out from a peft adapter folder and --base",
}
EXAMPLES = """examples:
  neoformer finetune runs/base --data chat.jsonl --out runs/sft --lora r=16,alpha=32 --max-steps 300
  neoformer finetune runs/base --data chat.jsonl --out runs/sft --resume        # continue that run
  neoformer finetune runs/base --data alpaca.jsonl --out runs/full --full --lr 3e-5
  neoformer finetune merge runs/sft --out runs/sft-merged
  neoformer finetune export-peft runs/sft --out peft-adapter
  neoformer finetune import-peft peft-adapter --base runs/base --out runs/imported
data: decoder: .txt (plain text), .jsonl with {"messages": [...]} (chat), {"instruction", "input",
"output"} (Alpaca) or {"text"}; encoder (masked LM): .txt or {"text"}; encoder-decoder: .jsonl with
{"source", "target"} or Alpaca. See docs/finetune.md."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a checkpoint (LoRA, QLoRA or full) on text, instruction or chat data",
        description="Fine-tune a decoder, encoder or encoder-decoder checkpoint, or (first word merge | export-peft | import-peft) work "
                    "with adapters.", epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False)
    p.add_argument("checkpoint", metavar="CKPT | ACTION", help="base checkpoint to fine-tune, or one of: "
                   + "; ".join(f"{name}: {what}" for name, what in ACTIONS.items()))
    p.add_argument("source", nargs="?", metavar="ADAPTER", help="with an action: the adapter (or peft folder)")
    p.add_argument("--data", metavar="FILE", help="training data (.txt, or .jsonl: chat, Alpaca or text)")
    p.add_argument("--out", metavar="DIR", help="run folder (training) or output folder (actions)")
    p.add_argument("--base", metavar="PATH", help="the adapter's base checkpoint, when it is no longer where the "
                   "adapter says (its weights must have the recorded sha256)")
    how = p.add_argument_group("what to train")
    how.add_argument("--lora", metavar="r=16,alpha=32,dropout=0.05",
                     help="LoRA settings (also rslora=true, dora=true); the default when --full is not given")
    how.add_argument("--targets", metavar="q,k,v,o,gate,up,down|all-linear", help="layers that get LoRA "
                     "(default q,k,v,o,gate,up,down; fused QKV adapts the chosen slices)")
    how.add_argument("--full", action="store_true", help="train every weight instead of an adapter")
    how.add_argument("--qlora", choices=("nf4", "int8"), help="quantize the frozen base first (QLoRA)")
    how.add_argument("--qlora-group-size", type=int, metavar="N", help="nf4 group size (default 64; must divide "
                     "the layers' input widths)")
    how.add_argument("--qlora-float-head", action="store_true", help="keep the output head in float (default: "
                     "quantized with the base; the embedding always stays float)")
    how.add_argument("--train-on", choices=("assistant", "all"), default="assistant",
                     help="loss on assistant replies only (default) or on every token")
    how.add_argument("--mask-prob", type=float, default=0.15, help="encoders: share of tokens masked (BERT's "
                     "80/10/10 rule)")
    how.add_argument("--no-packing", action="store_true", help="padded batches instead of packed rows")
    how.add_argument("--val-fraction", type=float, default=0.05, help="examples held out for validation")
    run = p.add_argument_group("run")
    run.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    run.add_argument("--max-steps", type=int, default=200)
    run.add_argument("--lr", type=float, help="peak learning rate (default 1e-3 LoRA, 3e-5 full)")
    run.add_argument("--batch", type=int, default=8, help="examples per step (packed: a row of batch*seq tokens)")
    run.add_argument("--seq", type=int, help="max tokens per example (default min(max_seq_len, 512))")
    run.add_argument("--grad-accum", type=int, default=1)
    run.add_argument("--eval-every", type=int, default=0, metavar="STEPS")
    run.add_argument("--save-every", type=int, default=0, metavar="STEPS")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", choices=("auto", "cpu", "cuda", "mps"), default="auto")
    run.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    run.add_argument("--threads", type=threads_arg, metavar="N|auto")
    run.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_finetune)


def _need(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) is None:
            flag = "ADAPTER" if name == "source" else f"--{name}"
            raise ValueError(f"neoformer finetune {args.checkpoint} needs {flag}")


def _run_action(args) -> int:
    from ..finetune import export_peft, import_peft, merge_adapter

    _need(args, "source", "out")
    if args.checkpoint == "merge":
        out = merge_adapter(args.source, args.out, base=args.base)
        print(f"merged {args.source} into {out}")
    elif args.checkpoint == "export-peft":
        out = export_peft(args.source, args.out, base=args.base)
        print(f"peft adapter written to {out}")
    else:
        _need(args, "base")
        out = import_peft(args.source, args.base, args.out)
        print(f"imported {args.source} as adapter checkpoint {out}")
    return 0


def run_finetune(args) -> int:
    if args.checkpoint in ACTIONS:
        return _run_action(args)
    from ..finetune import LoraConfig, finetune
    from ..train.run_config import TrainConfig

    _need(args, "data", "out")
    if args.source is not None:
        raise ValueError(f"unexpected argument {args.source!r}; actions are: {', '.join(ACTIONS)}")
    if args.full and (args.lora or args.targets):
        raise ValueError("--full trains every weight; drop --lora/--targets (or drop --full for LoRA)")
    lora = None if args.full else LoraConfig.parse(args.lora, args.targets)
    lr = args.lr if args.lr is not None else (3e-5 if args.full else 1e-3)
    train = TrainConfig(max_steps=args.max_steps, lr=lr, batch_size=args.batch, grad_accum=args.grad_accum,
                        eval_every=args.eval_every, save_every=args.save_every, seed=args.seed, device=args.device,
                        precision=args.precision, threads=args.threads, progress=not args.no_progress,
                        weight_decay=0.0 if lora else 0.1, warmup_steps=min(20, args.max_steps // 10), plot=False)
    result = finetune(args.checkpoint, args.data, args.out, lora=lora, train=train, seq_len=args.seq,
                      train_on=args.train_on, pack=not args.no_packing, qlora=args.qlora,
                      qlora_group_size=args.qlora_group_size, qlora_float_head=args.qlora_float_head,
                      mask_prob=args.mask_prob,
                      val_fraction=args.val_fraction, resume=args.resume)
    loss = f"{result.train_loss:.4f}" if result.train_loss is not None else "-"
    print(f"fine-tuned {result.step} steps (train loss {loss}); checkpoint {result.checkpoint}")
    return EXIT_INTERRUPTED.get(result.stop_reason, 0)
