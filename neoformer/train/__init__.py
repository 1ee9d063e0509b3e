"""Training: one ``fit()`` for every objective, optimizers and schedule, atomic checkpoints.

    from neoformer.train import fit, TrainConfig, objective_for, load_model
    result = fit(model, objective_for(model), batches, TrainConfig(max_steps=100), out_dir="runs/x")
    model, tokenizer = load_model("runs/x")

Names are resolved on first use (PEP 562): importing ``neoformer.train.run_config`` (the CLI's
--help does) must not import torch through fit.py.
"""
import sys
from types import ModuleType

from ..lazy import lazy_exports

# public name -> module that defines it
_EXPORTS = {
    **dict.fromkeys(("CheckpointError", "inspect_checkpoint", "list_checkpoints", "load_model",
                     "load_training_state", "load_weights", "resolve_checkpoint", "save_checkpoint"),
                    "neoformer.checkpoint"),
    **dict.fromkeys(("FitResult", "Trainer", "TrainingDiverged", "evaluate", "fit"), "neoformer.train.fit"),
    **dict.fromkeys(("OBJECTIVES", "causal_lm", "masked_lm", "objective_for", "seq2seq"),
                    "neoformer.train.objectives"),
    **dict.fromkeys(("Lion", "WarmupCosine", "build_optimizer"), "neoformer.train.optim"),
    **dict.fromkeys(("Distillation", "distillation", "kd_loss"), "neoformer.train.distill"),
    **dict.fromkeys(("DataConfig", "RunConfig", "TokenizerConfig", "TrainConfig", "load_run_config"),
                    "neoformer.train.run_config"),
}


class _TrainPackage(ModuleType):
    """Keeps ``neoformer.train.fit`` the function: importing the submodule ``train/fit.py`` would
    otherwise rebind the package attribute to the module (an eager ``from .fit import fit`` hid this)."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, ModuleType):
            return  # the name is resolved (to the function) by __getattr__ on first use
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _TrainPackage
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = [
    "fit", "evaluate", "FitResult", "Trainer", "TrainingDiverged", "TrainConfig", "RunConfig", "DataConfig",
    "TokenizerConfig", "load_run_config", "Lion", "WarmupCosine", "build_optimizer", "OBJECTIVES", "causal_lm",
    "masked_lm", "seq2seq", "objective_for", "Distillation", "distillation", "kd_loss", "CheckpointError",
    "save_checkpoint", "load_model", "load_weights", "load_training_state", "resolve_checkpoint", "list_checkpoints", "inspect_checkpoint",
]
