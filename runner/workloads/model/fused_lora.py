"""Fused LoRA projections: the frozen base matmul and the low-rank update in one autograd function.

PEFT computes a LoRA linear as `base(x) + lora_B(lora_A(dropout(x))) * scaling`: three matmuls, then a
scale and an add over the whole [tokens, out] output in the forward, and their mirror images in the backward
(a scale of the output gradient and an add of the two input gradients). On a CPU those passes over the
activations cost as much as a fifth of a LoRA step. Here the update is accumulated into the base output in
place (`addmm_` with the scale as its `alpha`), and the backward computes exactly the gradients LoRA needs:

    forward:  y = x W^T (+ b);  u = x A^T;  y += s * u B^T
    backward: g_u = g B;  dB = s * g^T u;  dA = s * g_u^T x;  dx = g W + s * g_u A

The base weight never gets a gradient (it is frozen). Only plain LoRA is fused (one active adapter, no
dropout, no DoRA, unmerged, a `torch.nn.Linear` base); any other layer keeps PEFT's forward. The adapter's
parameters are PEFT's own, so saving, loading and merging are unchanged.
"""

from __future__ import annotations

import types
from typing import Any

import torch


class _LoraLinear(torch.autograd.Function):
    """y = x W^T + bias + scale * (x A^T) B^T. The base matmul runs in the base weight's dtype and the low-rank
    path in the adapter's (PEFT keeps adapters in fp32 on a bf16 base); with one dtype the update is added in place
    into the base output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, a: torch.Tensor,
                b: torch.Tensor, scale: float) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xw = x2.to(w.dtype)
        y = torch.addmm(bias.to(w.dtype), xw, w.t()) if bias is not None else xw @ w.t()
        xa = x2.to(a.dtype)
        u = xa @ a.t()
        if y.dtype == b.dtype:
            y.addmm_(u, b.t(), alpha=scale)
        else:
            y.add_((u @ b.t()).mul_(scale).to(y.dtype))
        ctx.save_for_backward(xa, w, a, b, u)
        ctx.scale = scale
        ctx.shape = shape
        ctx.x_dtype = x.dtype
        return y.view(*shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xa, w, a, b, u = ctx.saved_tensors
        s = ctx.scale
        g2 = g.reshape(-1, g.shape[-1])
        ga = g2.to(b.dtype)
        gu = ga @ b  # [N, r]
        db = (ga.t() @ u).mul_(s) if ctx.needs_input_grad[4] else None
        da = (gu.t() @ xa).mul_(s) if ctx.needs_input_grad[3] else None
        dx = None
        if ctx.needs_input_grad[0]:
            base = g2.to(w.dtype) @ w
            if base.dtype == a.dtype:
                dx = base.addmm_(gu, a, alpha=s)
            else:
                dx = base.to(a.dtype).addmm_(gu, a, alpha=s)
            dx = dx.to(ctx.x_dtype).view(ctx.shape)
        return dx, None, None, da, db, None


def _fusable(layer: Any) -> str | None:
    """The adapter name when this PEFT LoRA layer can take the fused forward, else None."""
    names = list(getattr(layer, "active_adapters", []) or [])
    if len(names) != 1 or getattr(layer, "merged", False) or getattr(layer, "disable_adapters", False):
        return None
    name = names[0]
    base = getattr(layer, "base_layer", None)
    if type(base) is not torch.nn.Linear or getattr(layer, "fan_in_fan_out", False):
        return None
    if name not in getattr(layer, "lora_A", {}) or getattr(layer, "use_dora", {}).get(name, False):
        return None
    if not isinstance(layer.lora_dropout[name], torch.nn.Identity):
        return None
    if base.weight.requires_grad or (base.bias is not None and base.bias.requires_grad):
        return None
    return str(name)


def _fused_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    name = _fusable(self)
    if name is None or args or kwargs or not torch.is_grad_enabled():
        return self._qa_peft_forward(x, *args, **kwargs)
    base = self.base_layer
    a, b = self.lora_A[name].weight, self.lora_B[name].weight
    out = _LoraLinear.apply(x, base.weight, base.bias, a, b, float(self.scaling[name]))
    return out.to(x.dtype)


def fuse_lora(model: Any) -> int:
    """Give every fusable PEFT LoRA linear of `model` the fused forward; returns how many layers took it.
    Layers that cannot be fused (dropout, DoRA, several adapters, ...) keep PEFT's forward."""
    try:
        from peft.tuners.lora import Linear as LoraLinear
    except ImportError:
        return 0
    n = 0
    for module in model.modules():
        if isinstance(module, LoraLinear) and _fusable(module) is not None and not hasattr(module, "_qa_peft_forward"):
            module._qa_peft_forward = module.forward
            module.forward = types.MethodType(_fused_forward, module)
            n += 1
    return n
