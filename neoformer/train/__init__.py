"""Training: one ``fit()`` for every objective, optimizers and schedule, atomic checkpoints.

    from neoformer.train import fit, TrainConfig, objective_for, load_model
    result = fit(model, objective_for(model), batches, TrainConfig(max_steps=100), out_dir="runs/x")
    model, tokenizer = load_model("runs/x")
"""
from ..checkpoint import (
    CheckpointError, inspect_checkpoint, list_checkpoints, load_model, load_training_state, load_weights,
    resolve_checkpoint, save_checkpoint,
)
from .fit import FitResult, Trainer, TrainingDiverged, evaluate, fit
from .objectives import OBJECTIVES, causal_lm, masked_lm, objective_for, seq2seq
from .optim import Lion, WarmupCosine, build_optimizer
from .run_config import DataConfig, RunConfig, TokenizerConfig, TrainConfig, load_run_config

__all__ = [
    "fit", "evaluate", "FitResult", "Trainer", "TrainingDiverged", "TrainConfig", "RunConfig", "DataConfig",
    "TokenizerConfig", "load_run_config", "Lion", "WarmupCosine", "build_optimizer", "OBJECTIVES", "causal_lm",
    "masked_lm", "seq2seq", "objective_for", "CheckpointError", "save_checkpoint", "load_model", "load_weights",
    "load_training_state", "resolve_checkpoint", "list_checkpoints", "inspect_checkpoint",
]
