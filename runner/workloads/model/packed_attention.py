"""Attention over packed rows without a 4D mask: several sequences share one row and each attends only to
itself, causally.

`enable_packed_attention(model)` registers an attention function under a name of its own and switches the
model's config to it. Called without the `qa_packed` keyword it *is* SDPA, so every ordinary forward of the
model (padded batches, masks, generation) computes exactly what it did before. A forward that passes
`qa_packed=Packed(...)` inside `with packed_forward(packed):` (no attention mask is built for it) gets:

- on a CUDA device with `torch.nn.attention.varlen` (recent PyTorch; 2.11 has it): one variable-length
  flash-attention call per layer over the cumulative sequence lengths — no O(T^2) mask, no compute on pairs that
  never attend;
- elsewhere, or with attention dropout on: one causal SDPA call per sequence (exact; on a CPU, where every masked
  or padded position costs as much as a real one, this is the fast way).

For scoring, `Packed.last_layer` names the decoder's last layer and `Packed.ends` each sequence's final
position: there only those positions are computed (the final query of each sequence over its keys, and the
last MLP through hooks), since nothing reads the other positions' outputs. The hooks do nothing unless a
packed scoring forward is running on the calling thread.
"""

from __future__ import annotations

import inspect
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

PACKED_ATTENTION = "qa_packed_sdpa"


@dataclass
class Packed:
    """The sequences of a packed batch: [start, end) spans over the flattened B*T positions."""

    spans: list[tuple[int, int]]
    cu_seqlens: torch.Tensor  # int32 [n + 1] on the model's device
    max_len: int
    length: int  # B*T
    last_layer: int = -1  # scoring: the layer in which only `ends` are computed (-1: none)
    ends: torch.Tensor | None = None  # scoring: each sequence's final position, on the device

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], device: torch.device | str, last_layer: int = -1) -> Packed:
        """Spans of sequences of these lengths, back to back; with `last_layer` (scoring) also their final
        positions."""
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + int(n))
        spans = list(zip(bounds[:-1], bounds[1:], strict=True))
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        ends = cu[1:].long() - 1 if last_layer >= 0 else None
        return cls(spans, cu, max(lengths), bounds[-1], last_layer, ends)


_ACTIVE = threading.local()  # the Packed of the forward running on this thread (mask builder, last-MLP hooks)


@contextmanager
def packed_forward(packed: Packed) -> Iterator[None]:
    """Wrap a forward that passes `qa_packed=packed`: no attention mask is built for it, and in a scoring
    forward (`packed.ends` set) the last layer's MLP runs at `ends` only."""
    _ACTIVE.packed = packed
    try:
        yield
    finally:
        _ACTIVE.packed = None


def _packed_mask(*args: Any, **kwargs: Any) -> Any:
    if getattr(_ACTIVE, "packed", None) is not None:
        return None  # attention comes from the spans, not from a mask
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


# --- variable-length flash attention (CUDA) --------------------------------------------------------------

_VARLEN: Any = None  # the function, False when unavailable, None before the first look
_VARLEN_PARAMS: frozenset[str] = frozenset()


def varlen_available() -> bool:
    global _VARLEN, _VARLEN_PARAMS
    if _VARLEN is None:
        try:
            from torch.nn.attention.varlen import varlen_attn

            _VARLEN = varlen_attn
            _VARLEN_PARAMS = frozenset(inspect.signature(varlen_attn).parameters)
        except (ImportError, AttributeError):
            _VARLEN = False
    return _VARLEN is not False


def _varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
            max_q: int, max_k: int, causal: bool, scale: float | None) -> torch.Tensor:
    """varlen_attn over [tokens, heads, dim] tensors, across the PyTorch versions' signatures."""
    kw: dict[str, Any] = {"scale": scale}
    if causal:
        if "window_size" in _VARLEN_PARAMS:
            kw["window_size"] = (-1, 0)
        else:
            kw["is_causal"] = True
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        if "enable_gqa" in _VARLEN_PARAMS:
            kw["enable_gqa"] = True
        else:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    out = _VARLEN(q, k, v, cu_q, cu_k, max_q, max_k, **kw)
    return out[0] if isinstance(out, tuple) else out


# --- the attention function ------------------------------------------------------------------------------


def _flat(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B*T, H, D]"""
    B, H, T, D = x.shape
    return x.transpose(1, 2).reshape(B * T, H, D)


def packed_sdpa(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    qa_packed: Packed | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA, or with `qa_packed` causal attention inside each packed sequence only (returns [B, T, H, D])."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if qa_packed is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    B, H, T, D = query.shape
    last = qa_packed.ends is not None and getattr(module, "layer_idx", None) == qa_packed.last_layer
    q, k, v = _flat(query), _flat(key), _flat(value)  # [N, H, D]
    if query.is_cuda and varlen_available() and not dropout:  # the varlen kernel has no attention dropout
        if last:
            assert qa_packed.ends is not None
            n = len(qa_packed.spans)
            cu_q = torch.arange(n + 1, dtype=torch.int32, device=q.device)
            sel = _varlen(q[qa_packed.ends], k, v, cu_q, qa_packed.cu_seqlens, 1, qa_packed.max_len, False, scaling)
            out = q.new_zeros(q.shape)
            out[qa_packed.ends] = sel
        else:
            out = _varlen(q, k, v, qa_packed.cu_seqlens, qa_packed.cu_seqlens, qa_packed.max_len,
                          qa_packed.max_len, True, scaling)
        return out.view(B, T, H, D), None
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rep = H // k.shape[1]
    qh, kh, vh = q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None]  # [1, H, N, D]
    outs = []
    for a, b in qa_packed.spans:
        ks, vs = kh[:, :, a:b], vh[:, :, a:b]
        if rep > 1:
            ks, vs = ks.repeat_interleave(rep, dim=1), vs.repeat_interleave(rep, dim=1)
        if last:
            outs.append(sdpa(qh[:, :, b - 1 : b], ks, vs, scale=scaling, dropout_p=dropout))
        else:
            outs.append(sdpa(qh[:, :, a:b], ks, vs, is_causal=True, scale=scaling, dropout_p=dropout))
    o = torch.cat(outs, dim=2)[0].transpose(0, 1)  # [N or n, H, D]
    if last:
        assert qa_packed.ends is not None
        full = o.new_zeros(q.shape)
        full[qa_packed.ends] = o
        o = full
    return o.reshape(B, T, H, D), None


def _mlp_pre(module: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    packed: Packed | None = getattr(_ACTIVE, "packed", None)
    if packed is None or packed.ends is None:
        return None
    x = args[0]
    return (x.reshape(-1, x.shape[-1])[packed.ends][None], *args[1:])


def _mlp_post(module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
    packed: Packed | None = getattr(_ACTIVE, "packed", None)
    if packed is None or packed.ends is None:
        return None
    full = output.new_zeros(packed.length, output.shape[-1])
    full[packed.ends] = output[0]
    return full[None]


def decoder_layers(model: Any) -> Any:
    try:
        decoder = model.get_decoder()
    except (AttributeError, NotImplementedError):
        return None
    return getattr(decoder, "layers", None)


def enable_packed_attention(model: Any) -> bool:
    """Register and switch `model` to the packed attention function; True when it could (SDPA models with full
    attention in every layer). Ordinary forwards are unchanged (see the module docstring)."""
    cfg = getattr(model, "config", None)
    if cfg is None or getattr(cfg, "_attn_implementation", None) not in ("sdpa", PACKED_ATTENTION):
        return False
    if any(t != "full_attention" for t in getattr(cfg, "layer_types", None) or ["full_attention"]):
        return False
    if getattr(cfg, "use_sliding_window", False):
        return False
    layers = decoder_layers(model)
    if not layers or not hasattr(layers[-1], "mlp") or getattr(layers[-1].self_attn, "layer_idx", None) is None:
        return False
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    except ImportError:
        return False
    AttentionInterface.register(PACKED_ATTENTION, packed_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(PACKED_ATTENTION, _packed_mask)
    mlp = layers[-1].mlp
    if not getattr(mlp, "_qa_packed_hooks", False):
        mlp.register_forward_pre_hook(_mlp_pre)
        mlp.register_forward_hook(_mlp_post)
        mlp._qa_packed_hooks = True
    cfg._attn_implementation = PACKED_ATTENTION
    return True


def enable_packed_scoring(model: Any, device: torch.device | str) -> bool:
    """Prepare an inference-only model for packed scoring where scoring packs by default (a CPU: every padded token
    costs as much as a real one there); elsewhere leave it as it is. True when it took effect."""
    return torch.device(device).type == "cpu" and enable_packed_attention(model)


def packed_ready(model: Any) -> bool:
    return getattr(getattr(model, "config", None), "_attn_implementation", None) == PACKED_ATTENTION
