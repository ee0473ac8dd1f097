"""The memory model of this project's trainer: bytes per component (weights, LoRA, optimizer, activations, answer
logits, attention mask, runtime) for a setup, and the smallest change that would make a job fit."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from runner.preflight.shapes import KNOWN, Arch

GiB = 1024**3
MiB = 1024**2


DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


# GPU: runtime context (HIP/CUDA, kernels, communicator buffers) outside the allocator, and allocator slack.
RUNTIME_BYTES = 1.0 * GiB


ALLOCATOR_SLACK = 0.05


# CPU: the trainer process before the model is loaded (Python, torch, transformers, PEFT, accelerate, the tokenizer
# and the records), measured 433 MiB (tiny base) and 457 MiB (smollm2-135m) as peak RSS; see docs/containers.md.
CPU_RUNTIME_BYTES = 450 * MiB


# CPU, per token and layer, in elements of the model's dtype: besides the tensors autograd saves (counted with
# saved_tensors_hooks, see `_saved_per_layer`), a working set of ~8 x hidden stays resident in the process at the
# peak (the backward's transients and what glibc's allocator keeps). Measured as the slope of peak RSS over
# tokens minus the counted saved tensors: 8.2 x hidden (smollm2-135m, hidden 576) and 7.7 x hidden (tiny, 384).
CPU_WORKSET_HIDDEN = 8


# CPU with PEFT's own LoRA forward (train.fused_lora false): PEFT's base output, low-rank output, scaled product and
# sum per adapted layer churn the heap, and ~6 x hidden more per token and layer stays resident (measured 5.2-6.6 x
# hidden on smollm2-135m at 1k and 2k tokens; the saved tensors are the same as the fused forward's).
CPU_PEFT_WORKSET_HIDDEN = 6


# CPU with train.compile: inductor's compiled layers recompute pointwise ops in the backward and churn no transients:
# peak RSS grew 0.99 MiB a token on smollm2-135m (907 and 2,014 tokens), 0.85 x the eager layers' saved tensors
# and no working set; the two points' intercept is 234 MiB above the eager process's (inductor, compiled kernels).
CPU_COMPILED_SAVED = 0.85
CPU_COMPILE_BYTES = 240 * MiB


# Loss on full logits (a plain HF loop: every position): bf16 logits, fp32 log-probabilities and their gradient.
LOGIT_BYTES = 12


# This trainer's loss: logits only at the answer positions (one per sample: the letter's token). Per answer and
# vocabulary entry: the logits, their fp32 copy, the fp32 log-probabilities and the gradient (16 bytes, fp32 or bf16).
ANSWER_LOGIT_BYTES = 16


# Answers per micro-batch when the samples' lengths are not known: one per 32 tokens (a four-choice question with
# its prompt is longer than that; MMLU questions are 40-600 tokens, the built-in ones ~37).
SAMPLE_TOKENS = 32


RUNTIME = "runtime + allocator"


LAYOUTS = ("grouped", "varlen", "packed", "padded")


@dataclass(frozen=True)
class Setup:
    """What sizes the memory: per-device micro-batch, precision, adapter, sharding, the trainer's layout and options."""

    dtype: str  # bf16 | fp16 | fp32
    tokens: int  # tokens per micro-batch on one device (batch_size x max_seq_len)
    gradient_checkpointing: bool
    lora_r: int
    lora_targets: tuple[str, ...]
    lora_dropout: float
    gpus: int  # data-parallel ranks the base model is sharded over (FSDP FULL_SHARD when > 1)
    quant_bits: int = 16  # 4 or 8 for bitsandbytes weights
    training: bool = True
    device: str = "gpu"  # gpu | cpu: a CPU's peak is the process's RSS, a GPU's the allocator's peak + context
    layout: str = "varlen"  # the resolved train.layout: grouped | varlen | packed | padded
    row_len: int = 0  # tokens per row (train.max_seq_len): the T of a packed [B, 1, T, T] mask; 0: `tokens`
    fused_lora: bool = True  # train.fused_lora
    compile: bool = False  # train.compile (on a GPU charged as the eager layers: not measured there)
    sample_tokens: int = SAMPLE_TOKENS  # a short sample's length: answers per micro-batch = tokens / this
    full_logits: bool = False  # loss on every position's full vocabulary (a plain HF loop; not this trainer)

    @property
    def cpu(self) -> bool:
        return self.device == "cpu"

    def answers(self) -> int:
        """Answer positions (logits rows) per micro-batch: one per sample."""
        return max(1, math.ceil(self.tokens / max(1, self.sample_tokens)))

    def mask_elements(self) -> int:
        """Elements of the 4D attention mask of a micro-batch (B x T x T = tokens x row length); 0 without one."""
        if self.layout not in ("packed", "padded"):
            return 0
        return self.tokens * min(self.row_len or self.tokens, self.tokens)


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


def _adapted(arch: Arch, s: Setup) -> list[tuple[int, int, int]]:
    return [v for t, v in arch.linear_shapes().items() if t in s.lora_targets]


def _saved_per_layer_cpu(arch: Arch, s: Setup) -> float:
    """CPU: bytes per token and layer that autograd saves in this trainer's LoRA step, by layout. Counted with
    torch.autograd.graph.saved_tensors_hooks on Llama/Qwen2 layers (fp32; fused and PEFT LoRA save the same): the
    RMSNorms' inputs and outputs, q, the rotated k, v, the attention output, o_proj's input, the MLP's gate, up,
    act(gate) and their product, each adapter's [tokens, r] low-rank activation and the attention's log-sum-exp.

    grouped (causal SDPA, k/v kept at their KV width): 6 x hidden + 2 x KV width + 4 x MLP width elements;
    packed and padded (an attention mask: k/v repeated to every head): 8 x hidden + 4 x MLP width, and padded keeps
    a float mask row (T elements per token) in every layer; varlen (one SDPA call per sample on a CPU): 9 x hidden
    + 4 x MLP width."""
    b = DTYPE_BYTES[s.dtype]
    h, kvd, inter = arch.hidden, arch.kv_heads * arch.hd, arch.active_intermediate()
    if s.layout == "grouped":
        elems = 6 * h + 2 * kvd + 4 * inter
    elif s.layout == "varlen":
        elems = 9 * h + 4 * inter
    else:
        elems = 8 * h + 4 * inter
    if s.layout == "padded":
        elems += min(s.row_len or s.tokens, s.tokens)
    adapters = sum(n for _, _, n in _adapted(arch, s))
    out = elems * b + 4 * s.lora_r * adapters + 4 * arch.heads
    if s.lora_dropout > 0:  # PEFT's dropout: a dropped copy of each adapted layer's input and its mask
        out += sum((4 + 1) * i * n for i, _, n in _adapted(arch, s))
    return float(out)


def _per_layer_gpu(arch: Arch, s: Setup) -> float:
    """GPU (bf16): ~40 x hidden + 10 x MLP width + 4 x KV width bytes per token and layer (fitted to measured peaks
    of PEFT LoRA steps on an H200; see docs/containers.md)."""
    b = DTYPE_BYTES[s.dtype]
    scale = b / 2 if b > 2 else 1.0
    h, kvd, inter = arch.hidden, arch.kv_heads * arch.hd, arch.active_intermediate()
    per_layer = (40 * h + 10 * inter + 4 * kvd) * scale
    if arch.experts:
        per_layer += 4 * arch.experts  # router probabilities
    if s.lora_dropout > 0:
        per_layer += 6 * h + inter  # dropout masks
    return per_layer


def _loss(arch: Arch, s: Setup) -> Component:
    b = DTYPE_BYTES[s.dtype]
    if s.full_logits:
        per = LOGIT_BYTES * (b / 2 if b > 2 else 1.0)
        return Component("logits + loss", s.tokens * arch.vocab * per,
                         f"{s.tokens} tokens x {arch.vocab} vocab x {per:.0f} bytes (every position)")
    k = s.answers()
    return Component("answer logits + loss", k * arch.vocab * ANSWER_LOGIT_BYTES,
                     f"{k} answers x {arch.vocab} vocab x {ANSWER_LOGIT_BYTES} bytes (one per "
                     f"{s.sample_tokens} tokens)")


def estimate(arch: Arch, s: Setup) -> list[Component]:
    """Peak memory per device, by component, for this project's LoRA trainer (or inference when s.training is
    False): the peak RSS of the trainer process on a CPU, the allocator's peak plus the context on a GPU.

    Weights at their dtype (or 4/8-bit), LoRA weights, gradients and AdamW moments in fp32 (16 bytes a parameter).
    Activations per token and layer: on a CPU what autograd saves in the resolved layout (`_saved_per_layer_cpu`)
    plus a measured working set of 8 x hidden elements; on a GPU ~40 x hidden + 10 x MLP width + 4 x KV width
    bytes in bf16 (fitted to H200 peaks). Gradient checkpointing keeps each layer's input and recomputes one
    layer at a time. The loss: logits only at the answer positions (`answer_logits`: one per sample, answers =
    tokens / sample_tokens), 16 bytes per vocabulary entry; `full_logits` charges every position (12 bytes in
    bf16), as a plain HF loop computes them. `packed` holds a [B, 1, T, T] mask in the model's dtype. Runtime: a
    CPU process's Python + torch + transformers + tokenizer (450 MiB, measured); a GPU's 1 GiB context + 5 %
    allocator slack. Checked against the trainer's peak RSS on a CPU (tests/test_memory_model.py) and plain HF
    peaks on an H200 (docs/containers.md); `train.compile` is charged as the eager layers (not measured).
    """
    b = DTYPE_BYTES[s.dtype]
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
    h, L = arch.hidden, arch.layers
    inter = arch.active_intermediate()
    T = s.tokens
    if s.training:
        lp = lora_params(arch, s)
        out.append(Component("LoRA params+grads+AdamW", lp * 16 / shard,
                             f"{lp / 1e6:.1f} M params x (4+4+8) bytes, fp32"))
        work = 0
        if s.cpu and s.compile and s.layout != "varlen":  # the trainer compiles no varlen layers
            saved = _saved_per_layer_cpu(arch, s) * CPU_COMPILED_SAVED
            per_layer = saved
            how = f"{s.layout}, compiled: {saved / 1024:.0f} KiB saved"
        elif s.cpu:
            saved = _saved_per_layer_cpu(arch, s)
            work = CPU_WORKSET_HIDDEN + (0 if s.fused_lora else CPU_PEFT_WORKSET_HIDDEN)
            per_layer = saved + work * h * b
            how = f"{s.layout}: {saved / 1024:.0f} KiB saved + {work} x hidden working set"
        else:
            per_layer = _per_layer_gpu(arch, s)
            how = f"{per_layer / 1024:.0f} KiB"
        loss = _loss(arch, s)
        if s.gradient_checkpointing:
            # The loss backward and the recomputation of one layer happen at different times: the peak is
            # the stored layer inputs plus the larger of the two.
            # A CPU keeps its working set per layer (measured: -8 % to +12 % of the peak RSS, docs/containers.md).
            kept = (1 + work) * h * b
            out.append(Component("activations (checkpointed)", T * L * kept,
                                 f"{T} tokens x {L} layer inputs x {h * b} bytes"
                                 + (f" + {work} x hidden working set" if work else "")))
            layer = T * (per_layer - work * h * b)
            if layer > loss.bytes:
                out.append(Component("one layer recomputed", layer,
                                     f"{T} tokens x {how} (more than the loss: {loss.bytes / GiB:.2f} GiB)"))
            else:
                out.append(Component(loss.name, loss.bytes,
                                     f"{loss.note} (more than one recomputed layer: {layer / GiB:.2f} GiB)"))
        else:
            out.append(Component("activations", T * L * per_layer, f"{T} tokens x {L} layers x {how}"))
            out.append(loss)
        mask = s.mask_elements()
        if mask and (s.layout == "packed" or not s.cpu):  # a CPU's padded layout: in every layer (above)
            mb = b if s.layout == "packed" else 1
            out.append(Component(f"attention mask ({s.layout})", mask * mb,
                                 f"[B, 1, T, T] = {T} tokens x {min(s.row_len or T, T)} x {mb} bytes"))
    else:
        out.append(Component("activations (inference)", T * (4 * h + 2 * inter) * b, f"{T} tokens, one layer live"))
        out.append(Component("logits", T * arch.vocab * 6, f"{T} tokens x {arch.vocab} vocab"))
    if s.cpu and s.training and s.compile and s.layout != "varlen":
        out.append(Component("torch.compile (inductor)", CPU_COMPILE_BYTES, "measured: compiled kernels, inductor"))
    if s.cpu:
        out.append(Component(RUNTIME, CPU_RUNTIME_BYTES,
                             f"{CPU_RUNTIME_BYTES / MiB:.0f} MiB: Python, torch, transformers, tokenizer, records"))
    else:
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
