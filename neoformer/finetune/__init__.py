"""Fine-tuning: LoRA / DoRA / QLoRA adapters and full fine-tuning of decoders (text, instruction, chat
data), encoders (masked LM) and encoder-decoders (source/target pairs).

    from neoformer.finetune import finetune, LoraConfig, merge_adapter
    finetune("runs/base", "chat.jsonl", "runs/sft", lora=LoraConfig(r=8, targets=("q", "v")))
    model, tokenizer, config = neoformer.checkpoint.load_checkpoint("runs/sft")   # base + adapter
    merge_adapter("runs/sft", "runs/sft-merged")                                  # a normal checkpoint

Layout: ``lora.py`` (the module swap, merge), ``adapter.py`` (adapter checkpoints: the adapter plus
a verified base reference; the ``contents: adapter`` loader), ``data.py`` (formats, loss masks,
packing), ``tasks.py`` (per model kind: data, batches, objective), ``peft.py`` (peft's adapter
files, both ways), ``run.py`` (one run through fit()).
Guide: docs/finetune.md.
"""
from .adapter import (
    AdapterModel, adapter_settings, attach_adapter, base_reference, load_adapter, load_adapter_checkpoint, load_base,
    merge_adapter, trainable_share,
)
from .data import DataReport, Example, SFTBatches, chat_example, load_examples, sft_objective
from .lora import ALL_LINEAR, LoraConfig, LoraLinear, adapter_parameters, add_lora, lora_layers, merge_lora
from .peft import export_peft, import_peft
from .run import finetune

__all__ = [
    "ALL_LINEAR", "AdapterModel", "DataReport", "Example", "LoraConfig", "LoraLinear", "SFTBatches", "adapter_parameters",
    "adapter_settings", "add_lora", "attach_adapter", "base_reference", "chat_example", "export_peft", "finetune",
    "import_peft", "load_adapter", "load_adapter_checkpoint", "load_base", "load_examples", "lora_layers",
    "merge_adapter", "merge_lora", "sft_objective", "trainable_share",
]
