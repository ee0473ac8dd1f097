"""The memory model of this project's trainer: bytes per component (weights, LoRA, optimizer, activations, logits,
runtime) for a setup, and the smallest change that would make a job fit."""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    pass
from runner.preflight.shapes import KNOWN, Arch

GiB = 1024**3


DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


# Runtime context (HIP/CUDA, kernels, communicator buffers) outside the allocator, and allocator slack.
RUNTIME_BYTES = 1.0 * GiB


ALLOCATOR_SLACK = 0.05


# Loss on full logits: bf16 logits, fp32 log-probabilities and their gradient live together in its backward.
LOGIT_BYTES = 12


RUNTIME = "runtime + allocator"


@dataclass(frozen=True)
class Setup:
    """What sizes the memory: per-GPU micro-batch, precision, adapter, sharding."""

    dtype: str  # bf16 | fp16 | fp32
    tokens: int  # tokens per micro-batch on one GPU (batch_size x max_seq_len)
    gradient_checkpointing: bool
    lora_r: int
    lora_targets: tuple[str, ...]
    lora_dropout: float
    gpus: int  # data-parallel ranks the base model is sharded over (FSDP FULL_SHARD when > 1)
    quant_bits: int = 16  # 4 or 8 for bitsandbytes weights
    training: bool = True


@dataclass
class Component:
    name: str
    bytes: float
    note: str


def params_text(n: float) -> str:
    """A parameter count at a readable scale: 812.3 k, 134.5 M, 7.62 B (a tiny model is not `0.00 B`)."""
    if n >= 1e9:
        return f"{n / 1e9:.2f} B"
    if n >= 1e6:
        return f"{n / 1e6:.1f} M"
    return f"{n / 1e3:.1f} k"



def lora_params(arch: Arch, s: Setup) -> int:
    shapes = arch.linear_shapes()
    return arch.layers * sum(s.lora_r * (i + o) * n for t, (i, o, n) in shapes.items() if t in s.lora_targets)


def estimate(arch: Arch, s: Setup) -> list[Component]:
    """Peak memory per GPU, by component, for LoRA training (or inference when s.training is False).

    Activations per token and layer (bf16): the norms keep their fp32 input, PEFT keeps an fp32 copy of each
    adapted layer's input, attention keeps q/k/v/out, the MLP keeps gate, up, act(gate) and their product:
    about 40*hidden + 10*intermediate + 4*kv_width bytes. Gradient checkpointing keeps each layer's bf16 input
    and recomputes one layer at a time. The loss keeps bf16 logits, fp32 log-probabilities and their gradient:
    12 bytes per vocabulary entry per token. Checked against measured peaks (docs/containers.md).
    """
    b = DTYPE_BYTES[s.dtype]
    scale = b / 2 if b > 2 else 1.0
    n = max(1, s.gpus)
    shard = n if n > 1 else 1
    P = arch.params()
    out: list[Component] = []
    if s.quant_bits < 16:
        linear = arch.layers * (arch.layer_params() - 2 * arch.hidden)
        wbytes = linear * (s.quant_bits / 8 + 4 / 64) + (P - linear) * 2
        out.append(Component(f"weights ({s.quant_bits}-bit)", wbytes / shard,
                             f"{params_text(P)} params, linear layers at {s.quant_bits} bits"))
    else:
        note = f"{params_text(P)} params x {b} bytes = {P * b / 1e9:.1f} GB" + (
            f" / {shard} GPUs (FSDP)" if shard > 1 else "")
        out.append(Component(f"weights ({s.dtype})", P * b / shard, note))
    if shard > 1:  # FSDP gathers a layer (and prefetches the next) in full
        out.append(Component("gathered layers (FSDP)", 2 * arch.layer_params() * b, "2 layers unsharded"))
    h, L, kvd = arch.hidden, arch.layers, arch.kv_heads * arch.hd
    inter = arch.active_intermediate()
    T = s.tokens
    if s.training:
        lp = lora_params(arch, s)
        out.append(Component("LoRA params+grads+AdamW", lp * 16 / shard,
                             f"{lp / 1e6:.1f} M params x (4+4+8) bytes, fp32"))
        per_layer = (40 * h + 10 * inter + 4 * kvd) * scale
        if arch.experts:
            per_layer += 4 * arch.experts  # router probabilities
        if s.lora_dropout > 0:
            per_layer += 6 * h + inter  # dropout masks
        logits = T * arch.vocab * LOGIT_BYTES * scale
        if s.gradient_checkpointing:
            # The loss backward and the recomputation of one layer happen at different times: the peak is
            # the stored layer inputs plus the larger of the two.
            out.append(Component("activations (checkpointed)", T * L * h * b,
                                 f"{T} tokens x {L} layer inputs x {h * b} bytes"))
            layer = T * per_layer
            if layer > logits:
                out.append(Component("one layer recomputed", layer,
                                     f"{T} tokens x {per_layer / 1024:.0f} KiB (more than the loss: "
                                     f"{logits / GiB:.1f} GiB)"))
            else:
                out.append(Component("logits + loss", logits,
                                     f"{T} tokens x {arch.vocab} vocab x {LOGIT_BYTES} bytes (more than one "
                                     f"recomputed layer: {layer / GiB:.1f} GiB)"))
        else:
            out.append(Component("activations", T * L * per_layer,
                                 f"{T} tokens x {L} layers x {per_layer / 1024:.0f} KiB"))
            out.append(Component("logits + loss", logits, f"{T} tokens x {arch.vocab} vocab x {LOGIT_BYTES} bytes"))
    else:
        out.append(Component("activations (inference)", T * (4 * h + 2 * inter) * b, f"{T} tokens, one layer live"))
        out.append(Component("logits", T * arch.vocab * 6, f"{T} tokens x {arch.vocab} vocab"))
    sub = sum(c.bytes for c in out)
    out.append(Component(RUNTIME, RUNTIME_BYTES + ALLOCATOR_SLACK * sub,
                         f"{RUNTIME_BYTES / GiB:.0f} GiB context + {ALLOCATOR_SLACK:.0%} fragmentation"))
    return out


def total(components: list[Component]) -> float:
    return sum(c.bytes for c in components)


def allocated(components: list[Component]) -> float:
    """What PyTorch's allocator would report as peak (torch.cuda.max_memory_allocated): all but the runtime."""
    return sum(c.bytes for c in components if c.name != RUNTIME)


def _fits(arch: Arch, s: Setup, cap: float) -> bool:
    return total(estimate(arch, s)) <= cap


def suggest(arch: Arch, s: Setup, cap: float, gpu_label: str, max_gpus: int = 64) -> list[str]:
    """Changes that would make the job fit, each with its resulting total."""
    out: list[str] = []

    def t(x: Setup) -> str:
        return f"{total(estimate(arch, x)) / GiB:.1f} GiB per GPU"

    if s.training and not s.gradient_checkpointing:
        gc = replace(s, gradient_checkpointing=True)
        if _fits(arch, gc, cap):
            out.append(f"model.gradient_checkpointing: true ({t(gc)})")
    s2 = s if _fits(arch, replace(s, tokens=1), cap) or s.gradient_checkpointing else replace(
        s, gradient_checkpointing=True)
    if _fits(arch, replace(s2, tokens=256), cap):
        lo, hi = 256, s2.tokens
        while hi - lo > 64:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if _fits(arch, replace(s2, tokens=mid), cap) else (lo, mid)
        if lo < s.tokens:
            extra = "" if s2 is s else " with gradient checkpointing"
            out.append(f"at most ~{lo} tokens per micro-batch{extra} (train.batch_size x train.max_seq_len; raise "
                       f"train.grad_accum to keep the tokens per step) ({t(replace(s2, tokens=lo))})")
    for n in range(max(2, s.gpus + 1), max_gpus + 1):
        m = replace(s2, gpus=n)
        if _fits(arch, m, cap):
            out.append(f"resources.gpus: {n} x {gpu_label} with the base sharded by FSDP ({t(m)})")
            break
    else:
        if max_gpus > 1:
            out.append(f"not even {max_gpus} x {gpu_label} at this micro-batch")
    family = re.sub(r"-[\d.]+b.*$", "", arch.name.lower())
    smaller = sorted((a for a in KNOWN.values() if a.name.lower().startswith(family) and a.params() < arch.params()),
                     key=lambda a: -a.params())
    for a in smaller:
        if _fits(a, s, cap):
            out.append(f"a smaller model: {a.name} ({a.params() / 1e9:.1f} B, {total(estimate(a, s)) / GiB:.1f} GiB "
                       f"per GPU as configured)")
            break
    return out
