"""``format="aoti"``: a decoder's cached step compiled ahead of time by AOTInductor (``model.pt2``).

The ExportedProgram that ``--format torch-export`` writes (dynamic batch, new-token count and past
length; an empty past is the prefill, one new token a decode step) compiled to C++ for this CPU by
``torch._inductor.aoti_compile_and_package``; it runs without Python's model code. Load it with
``torch._inductor.aoti_load_package`` or :class:`AotiDecoder`. The compiled kernels index inputs
with contiguous strides, so pass contiguous tensors (a slice like ``ids[:, t:t + 1]`` read the wrong
elements: Δlogit ~0.5, measured); :class:`AotiDecoder` copies them. Loading runs a shared library:
load only packages you wrote or trust.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .common import ExportError, Source
from .torch_formats import exported_program, verify_one_step, write_meta


def check_supported(source: Source, dtype, quant) -> None:
    if not source.kind.causal or source.kind.encoder_layers:
        raise ExportError("aoti packages a decoder's cached step; export encoders and encoder-decoders with "
                          "--format torch-export, onnx or hf")


def write_aoti(source: Source, out: Path, dtype: torch.dtype) -> dict:
    program, names = exported_program(source, dtype)
    try:
        torch._inductor.aoti_compile_and_package(program, package_path=str(out / "model.pt2"))
    except Exception as error:  # no C++ compiler, an op Inductor cannot lower, ...
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ExportError(f"AOTInductor could not compile the model ({first[:200]}); use --format torch-export") \
            from error
    write_meta(source, out, "aoti", names, dtype)
    return {}


class AotiDecoder:
    """The loaded package, called like the one-step module: (input_ids, attention_mask, *past) ->
    (logits, *present)."""

    def __init__(self, folder: str | Path):
        self.run = torch._inductor.aoti_load_package(str(Path(folder) / "model.pt2"))

    def __call__(self, *inputs):
        return self.run(*(t.contiguous() for t in inputs))


@torch.no_grad()
def verify_aoti(source: Source, out: Path, dtype: torch.dtype, facts: dict) -> tuple[float, str]:
    return verify_one_step(source, dtype, AotiDecoder(out), "aoti")
