"""lm-evaluation-harness on a neoformer model, with no Hugging Face conversion and no network.

:class:`NeoformerLM` is an lm-eval ``LM`` (registered as ``"neoformer"``, so
``lm_eval --model neoformer --model_args pretrained=runs/x/latest`` works too):

- ``loglikelihood`` goes through :func:`.scoring.continuation_logprobs` (sorted by length, shared
  contexts read once through the KV cache); ``loglikelihood_rolling`` batches the windows of every
  document through :func:`.scoring.window_logprobs` (no greedy flag, no stored log-softmax);
- ``generate_until`` runs batches of prompts, longest first: greedy ones through
  :func:`.generation.greedy_until` (a shared prefix read once, the rest prefilled without padding,
  then the engine's decode step), sampled ones through ``neoformer.generate``; the task's stop
  sequences and EOS end each row.

:func:`run_tasks` runs named tasks offline: ``HF_DATASETS_OFFLINE=1`` / ``HF_HUB_OFFLINE=1``
unless ``NEOFORMER_ALLOW_DOWNLOAD=1``, local YAML tasks from ``include_path``, and a one-line
error naming a missing local data file or a dataset that is not on this machine.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

try:
    import lm_eval  # noqa: F401
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import Collator, handle_stop_sequences, normalize_gen_kwargs
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as err:  # pragma: no cover - the message is the point
    raise ImportError("lm-evaluation-harness is not installed: pip install 'neoformer[eval]'") from err

import torch

from ..config import did_you_mean
from ..generate import generate
from ..generate.stops import cut_at_stop
from .generation import greedy_until, keeps_model_state
from .scoring import continuation_logprobs, window_logprobs

ALLOW_DOWNLOAD_ENV = "NEOFORMER_ALLOW_DOWNLOAD"
DEFAULT_MAX_GEN_TOKS = 256
# dataset builders that read local files named in dataset_kwargs.data_files
FILE_BUILDERS = {"json", "csv", "parquet", "text", "arrow"}


@register_model("neoformer")
class NeoformerLM(TemplateLM):
    """An lm-eval language model backed by a neoformer decoder and its tokenizer."""

    def __init__(self, model=None, tokenizer=None, *, pretrained: str | None = None, batch_size: int | str = 32,
                 max_length: int | None = None, device: str | None = None, max_gen_toks: int = DEFAULT_MAX_GEN_TOKS,
                 **_ignored):
        super().__init__()
        if model is None:
            if pretrained is None:
                raise ValueError("NeoformerLM needs a model and tokenizer, or pretrained=CHECKPOINT")
            from ..checkpoint import load_checkpoint

            model, tokenizer, _ = load_checkpoint(pretrained, device=device or "cpu", kinds=("decoder",),
                                                  command="lm-eval")
        if tokenizer is None:
            raise ValueError("lm-eval needs the checkpoint's tokenizer; this checkpoint holds none")
        self.model, self.tokenizer = model.eval(), tokenizer
        self._batch_size = int(batch_size) if str(batch_size) != "auto" else 32
        self._max_length = max_length or model.config.max_seq_len
        self._max_gen_toks = max_gen_toks

    # ---- what lm-eval asks about the model ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.tokenizer, "bos_id", None)  # as lm-eval's HF backend: BOS, else EOS
        return bos if bos is not None else self.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self):
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return f"neoformer-{self.tokenizer.kind}-{self.tokenizer.fingerprint()[:12]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ---- the three request types -------------------------------------------------------------
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = continuation_logprobs(self.model, [(ctx, cont) for _, ctx, cont in requests],
                                        batch_size=self.batch_size, max_length=self.max_length,
                                        pad_id=self._pad_id)
        for (key, _, _), answer in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, answer)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for index, (text,) in enumerate(req.args for req in requests):
            for window in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(window)
                owner.append(index)
        totals = [0.0] * len(requests)
        scores = window_logprobs(self.model, windows, batch_size=self.batch_size, max_length=self.max_length,
                                 pad_id=self._pad_id)
        for index, logprob in zip(owner, scores):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        self._encoded = {text: self.tok_encode(text) for text in {req.args[0] for req in requests}}  # once each
        by_options = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self._encoded[r[0]]), r[0]),
                              group_by="gen_kwargs", group_fn=lambda r: r[1])
        eos_text = self.tokenizer.decode([self.eot_token_id])
        out: list[str] = []
        for chunk in by_options.get_batched(n=self.batch_size):
            contexts, options = zip(*chunk)
            out.extend(self._generate_batch(list(contexts), dict(options[0]), eos_text))
            for context, text in zip(contexts, out[-len(contexts):]):
                self.cache_hook.add_partial("generate_until", (context, options[0]), text)
        return by_options.get_original(out)

    def _generate_batch(self, contexts: list[str], options: dict, eos_text: str) -> list[str]:
        kwargs = normalize_gen_kwargs(options, self._max_gen_toks)
        stops = [s for s in handle_stop_sequences(kwargs.pop("until", None), eos=eos_text) if s]
        max_new = int(kwargs.pop("max_gen_toks"))
        if max_new >= self.max_length:
            raise ValueError(f"max_gen_toks ({max_new}) must be below the model's context ({self.max_length})")
        room = self.max_length - max_new
        prompts = [(self._encoded[c] or [self.prefix_token_id])[-room:] for c in contexts]
        sampling = {}
        if kwargs.get("do_sample") and kwargs.get("temperature", 1.0) > 0:
            sampling = {"do_sample": True, "temperature": float(kwargs.get("temperature", 1.0)),
                        "top_p": kwargs.get("top_p"), "top_k": kwargs.get("top_k"), "seed": kwargs.get("seed", 1234)}
        if not sampling and not keeps_model_state(self.model):  # shared prefix once, no padded prefill
            return greedy_until(self.model, self.tokenizer, prompts, max_new, stops, self.eot_token_id)
        result = generate(self.model, prompts, max_new, tokenizer=self.tokenizer, stop=tuple(stops),
                          eos_token_id=self.eot_token_id, return_dict=True,
                          **{k: v for k, v in sampling.items() if v is not None})
        eos = self.eot_token_id
        return [cut_at_stop(self.tok_decode([t for t in toks if t != eos]), stops) for toks in result.new_tokens]

    @property
    def _pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_id", None)
        return pad if pad is not None else self.tokenizer.eos_id


# ---- running tasks offline ---------------------------------------------------------------------
def _offline() -> None:
    if os.environ.get(ALLOW_DOWNLOAD_ENV) != "1":
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        os.environ["HF_HUB_OFFLINE"] = "1"


def task_manager(tasks: list[str], include_path: str | os.PathLike | None = None):
    """lm-eval's TaskManager; reads only ``include_path`` when every task is there (indexing the
    ~15k built-in task files takes seconds)."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        folder = Path(include_path)
        if not folder.is_dir():
            raise FileNotFoundError(f"--include-path {folder} is not a folder of task YAML files")
        local = TaskManager(include_path=str(folder), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    for task in tasks:
        if task not in manager.all_tasks:
            hint = did_you_mean(task, manager.all_tasks)
            raise ValueError(f"unknown lm-eval task {task!r}{hint}"
                             + ("" if include_path else "; local YAML tasks need --include-path DIR"))
    return manager


def _data_files(kwargs: dict[str, Any]) -> list[str]:
    files = (kwargs or {}).get("data_files") or []
    if isinstance(files, str):
        return [files]
    if isinstance(files, dict):
        return [f for v in files.values() for f in ([v] if isinstance(v, str) else v)]
    return list(files)


def check_local_data(manager, tasks: list[str]) -> None:
    """One line naming the first local data file a task reads that is not there."""
    for task in tasks:
        entry = manager.task_index.get(task)
        cfg = (entry.cfg if entry is not None else None) or {}
        path = cfg.get("dataset_path")
        if path in FILE_BUILDERS:
            for name in _data_files(cfg.get("dataset_kwargs")):
                if "*" not in name and not Path(name).exists():
                    raise FileNotFoundError(f"task {task}: data file {name} (dataset_kwargs.data_files in "
                                            f"{entry.yaml_path}) does not exist")
        elif isinstance(path, str) and (path.startswith(("/", "./", "../"))) and not Path(path).exists():
            raise FileNotFoundError(f"task {task}: dataset_path {path} (in {entry.yaml_path}) does not exist")


def run_tasks(model, tokenizer, tasks: list[str], *, include_path=None, limit: int | float | None = None,
              batch_size: int = 32, num_fewshot: int | None = None, seed: int = 0) -> dict[str, Any]:
    """lm-eval ``simple_evaluate`` on ``model`` offline -> ``{"results": {task: {metric: value}}, ...}``."""
    _offline()
    from lm_eval import simple_evaluate

    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = task_manager(tasks, include_path)
    check_local_data(manager, tasks)
    lm = NeoformerLM(model, tokenizer, batch_size=batch_size)
    try:
        out = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, limit=limit, num_fewshot=num_fewshot,
                              log_samples=False, bootstrap_iters=0, random_seed=seed, numpy_random_seed=seed,
                              torch_random_seed=seed, fewshot_random_seed=seed)
    except (FileNotFoundError, ConnectionError, OSError) as err:
        raise FileNotFoundError(f"lm-eval could not read a dataset offline ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else ''}); point the task at local files "
                                f"(dataset_path: json + dataset_kwargs.data_files) or set {ALLOW_DOWNLOAD_ENV}=1") from None
    return {"results": _plain(out["results"]), "n_samples": _plain(out.get("n-samples", {})),
            "versions": _plain(out.get("versions", {}))}


def _plain(obj):
    """JSON-safe copy (lm-eval puts numpy scalars and 'N/A' strings in its results)."""
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, torch.Tensor):
        return obj.item()
    return obj


__all__ = ["NeoformerLM", "run_tasks", "task_manager", "check_local_data"]
