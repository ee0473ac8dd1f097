"""The `train` section of a train job: optimisation, layout of a step's samples, and the speed options."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from runner.spec.section import Section


class TrainSpec(Section):
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(16, ge=1, description="Sequences (or packed rows) per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    tokens_per_step: int | None = Field(
        None, ge=1, description="Token budget per optimizer step; sets gradient accumulation when given."
    )
    lr: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(10, ge=0, description="Linear warm-up steps.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="LR schedule after warm-up.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    max_seq_len: int = Field(512, ge=16, description="Longest sequence (or packed row) in tokens.")
    packing: bool = Field(True, description="Fill each step with samples up to a token budget (rows of "
                          "`max_seq_len` tokens); `false`: `batch_size` samples per micro-batch.")
    layout: Literal["auto", "grouped", "varlen", "packed", "padded"] = Field(
        "auto",
        description="How a step's samples become tensors (the gradient is the same in every layout): `grouped`, "
        "sorted by length into right-padded rows with causal attention and no mask (the CPU's fastest); "
        "`varlen`, packed rows with attention per sample (the variable-length flash kernel on CUDA); `packed`, "
        "packed rows with a block-diagonal 4D mask; `padded`, padded rows in step order; `auto`, `varlen` on "
        "CUDA where the kernel exists, else `grouped`.",
    )
    fused_lora: bool = Field(
        True, description="Fused LoRA projections: the base matmul and the low-rank update in one autograd "
        "function (equal gradients; fewer passes over the activations). Layers it cannot fuse keep PEFT's."
    )
    compile: bool = Field(
        False, description="torch.compile each decoder layer's training forward (dynamic shapes; the first steps "
        "pay the compile, ~30 s for a 30-layer model on a CPU). Not applied to the `varlen` layout."
    )
    eval_every: int = Field(50, ge=1, description="Validate every N steps (and at step 0 and the end).")
    save_every: int = Field(50, ge=1, description="Checkpoint every N steps (and at the end).")
    log_every: int = Field(10, ge=1, description="Write a train metrics line every N steps.")
    keep_checkpoints: int = Field(2, ge=1, description="Keep the last N checkpoints plus the best.")
    seed: int = Field(0, description="Seed for everything random in training.")
    deterministic: bool = Field(False, description="Deterministic kernels (slower; exact resume comparisons).")
    threads: int | None = Field(None, ge=1, description="CPU threads for torch (CPU runs).")
    on_nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="What a non-finite loss or gradient norm does: `stop` fails the run naming the step; `skip` "
        "drops that step's update and counts it (`skipped_steps`); 10 skips in a row fail the run.",
    )
