"""`train.compile`: torch.compile of each decoder layer's training forward.

Every layer of a decoder has the same code, so with PyTorch's default of treating module parameters as graph
inputs the layers share one compiled graph (compiled once, with dynamic batch and sequence sizes). Only
forwards with gradients on and no packed-attention spans are compiled: validation and scoring forwards (no
grad, or per-sequence spans whose Python structure changes every batch) run the layer as it was, so they never
trigger a recompile.
"""

from __future__ import annotations

from typing import Any

import torch

from runner.workloads.model.packed_attention import decoder_layers


def compile_layers(model: Any) -> int:
    """Compile the training forward of every decoder layer of `model` (a PEFT model or a plain one); returns the
    number of layers wrapped (0 when the model has no decoder layers to find)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layers = decoder_layers(base)
    if not layers:
        return 0
    n = 0
    for layer in layers:
        if getattr(layer, "_qa_compiled", False):
            continue
        eager = layer.forward
        compiled = torch.compile(eager, dynamic=True)

        def forward(*args: Any, _eager: Any = eager, _compiled: Any = compiled, **kwargs: Any) -> Any:
            if torch.is_grad_enabled() and kwargs.get("qa_packed") is None:
                return _compiled(*args, **kwargs)
            return _eager(*args, **kwargs)

        layer.forward = forward
        layer._qa_compiled = True
        n += 1
    return n
