"""Compression: the Nexus pipeline (layer, head, FFN, width and vocabulary reduction, then
knowledge distillation through the one ``fit()``). See docs/compress.md.

    from neoformer.compress import compress, CompressPlan, DistillConfig
    report = compress("runs/teacher", "runs/student", CompressPlan(layers="4", width=0.5))

The pieces are usable alone: ``block_influence`` / ``keep_layers`` (depth), ``head_importance`` /
``prune_heads``, ``prune_ffn``, ``rotate_width`` (SliceGPT PCA) / ``slice_channels`` (Minitron),
``reduce_tokenizer`` / ``slice_vocab``; the KD objective is ``neoformer.train.distill.Distillation``.
"""
from ..train.distill import Distillation, kd_loss
from .depth import block_influence, choose_layers, keep_layers, skip_loss_increase
from .heads import head_importance, prune_heads
from .pipeline import Compressed, DistillConfig, compress, reduce
from .plan import CompressError, CompressPlan, recipe_plan
from .vocab import VocabReduction, reduce_tokenizer, slice_vocab
from .width import fold_norm_gains, neuron_importance, pca_rotation, prune_ffn, rotate_width, slice_channels

__all__ = [
    "compress", "reduce", "Compressed", "CompressPlan", "CompressError", "DistillConfig", "recipe_plan",
    "block_influence", "skip_loss_increase", "choose_layers", "keep_layers", "head_importance", "prune_heads",
    "neuron_importance", "prune_ffn", "rotate_width", "slice_channels", "fold_norm_gains", "pca_rotation",
    "VocabReduction", "reduce_tokenizer", "slice_vocab", "Distillation", "kd_loss",
]
