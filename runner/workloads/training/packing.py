"""Turn MCQ records into training tensors: tokenised examples, packed rows (samples never attend to each other;
position ids restart per sample), padded batches, and the answer-only loss.

Packed rows keep samples apart in one of two ways. By default an additive block-diagonal [B, 1, T, T] mask
(with transformers 5 on sdpa/eager, restarting position ids alone would still let a sample attend to the ones
before it). Where variable-length attention is available (`packed_attention`: PyTorch's varlen flash kernel on
CUDA), `collate_packed(..., mask=False)` builds no mask at all and the forward passes the samples' lengths
instead: no O(T^2) mask, and the flash kernel instead of the masked ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from runner.workloads.model.packed_attention import Packed, packed_forward, packed_ready, varlen_available
from runner.workloads.scoring.prompts import prompter


@dataclass
class Example:
    """One tokenised sample: loss is on ids[label_start:] (the answer tokens)."""

    ids: list[int]
    label_start: int

    def __len__(self) -> int:
        return len(self.ids)


def encode_mcq(tokenizer: Any, rec: Any, max_len: int, answer: str | None = None, prompt_style: Any = None) -> Example:
    """Prompt tokens exactly as scoring sees them (in `prompt_style`, default plain), then the answer letter's
    token; long prompts lose their start."""
    fmt = prompter(tokenizer, prompt_style)
    prompt = fmt.encode_text(fmt.item_text(rec))
    completion = fmt.answer_ids(answer or rec.answer)
    keep = max(1, max_len - len(completion))
    if len(prompt) > keep:
        prompt = prompt[-keep:]
    return Example(ids=prompt + completion, label_start=len(prompt))


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, 1, T, T] additive (packed), [B, T] 0/1 (padded), None: seq_lens, or causal only (grouped)
    loss_mask: torch.Tensor  # [B, T] bool: positions whose next token is an answer token
    targets: torch.Tensor  # [K] the answer tokens, in loss_mask order (row-major)
    n_tokens: int  # real (non-pad) tokens
    n_samples: int
    seq_lens: list[int] | None = None  # packed: lengths of the samples and pad tails over the flattened B*T

    def to(self, device: torch.device | str) -> Batch:
        return Batch(
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            attention_mask=None if self.attention_mask is None else self.attention_mask.to(device),
            loss_mask=self.loss_mask.to(device),
            targets=self.targets.to(device),
            n_tokens=self.n_tokens,
            n_samples=self.n_samples,
            seq_lens=self.seq_lens,
        )


def pack_rows(lengths: Sequence[int], row_len: int) -> list[list[int]]:
    """Indices of samples per row, filled in order (a sample that does not fit starts the next row)."""
    rows: list[list[int]] = []
    fill = row_len
    for i, n in enumerate(lengths):
        if n > row_len:
            raise ValueError(f"sample of {n} tokens is longer than the row length {row_len}")
        if fill + n > row_len:
            rows.append([])
            fill = 0
        rows[-1].append(i)
        fill += n
    return rows


def collate_packed(
    rows: Sequence[Sequence[Example]],
    pad_id: int,
    dtype: torch.dtype = torch.float32,
    row_len: int | None = None,
    mask: bool = True,
) -> Batch:
    """Rows of examples -> one packed batch. T is the longest row (or `row_len`); pad positions attend only to
    themselves (a fully masked row would give NaNs) and carry no loss. `mask=False`: no 4D mask, only
    `seq_lens` (each row's pad tail is one sequence of its own), for variable-length attention."""
    T = row_len or max(sum(len(e) for e in row) for row in rows)
    B = len(rows)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    pos = torch.zeros((B, T), dtype=torch.long)
    seg = torch.arange(T).repeat(B, 1) + 1_000_000  # pads: a segment of their own
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    targets: list[int] = []
    seq_lens: list[int] = []
    n_tokens = 0
    n_samples = 0
    for b, row in enumerate(rows):
        o = 0
        for s, ex in enumerate(row):
            n = len(ex)
            ids[b, o : o + n] = torch.tensor(ex.ids)
            pos[b, o : o + n] = torch.arange(n)
            seg[b, o : o + n] = s
            loss_mask[b, o + ex.label_start - 1 : o + n - 1] = True
            o += n
            n_tokens += n
            n_samples += 1
            seq_lens.append(n)
        if o > T:
            raise ValueError(f"row {b} holds {o} tokens, more than the row length {T}")
        if o < T:
            seq_lens.append(T - o)
        targets.extend(_row_targets(row))
    tgt = torch.tensor(targets, dtype=torch.long)
    if not mask:
        return Batch(ids, pos, None, loss_mask, tgt, n_tokens, n_samples, seq_lens)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    allowed = (seg[:, :, None] == seg[:, None, :]) & causal
    am = torch.zeros((B, 1, T, T), dtype=dtype).masked_fill(~allowed[:, None], torch.finfo(dtype).min)
    return Batch(ids, pos, am, loss_mask, tgt, n_tokens, n_samples, seq_lens)


def _row_targets(row: Sequence[Example]) -> list[int]:
    out: list[int] = []
    for ex in row:
        out.extend(ex.ids[ex.label_start :])
    return out


def collate_padded(examples: Sequence[Example], pad_id: int) -> Batch:
    """Plain right-padded batch with a 2D attention mask (one sample per row)."""
    T = max(len(e) for e in examples)
    B = len(examples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.long)
    loss_mask = torch.zeros((B, T), dtype=torch.bool)
    targets: list[int] = []
    for b, ex in enumerate(examples):
        n = len(ex)
        ids[b, :n] = torch.tensor(ex.ids)
        att[b, :n] = 1
        loss_mask[b, ex.label_start - 1 : n - 1] = True
        targets.extend(ex.ids[ex.label_start :])
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    n_tok = int(att.sum())
    return Batch(ids, pos, att, loss_mask, torch.tensor(targets, dtype=torch.long), n_tok, B)


def collate_grouped(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-padded rows with no attention mask at all: causal attention alone is exact here, since every pad
    comes after its row's real tokens and no real position attends forward. Position ids run 0..T-1 on every
    row (a sample's own positions are 0..n-1 either way), so the attention takes SDPA's causal fast path."""
    b = collate_padded(examples, pad_id)
    T = b.input_ids.shape[1]
    pos = torch.arange(T).repeat(len(examples), 1)
    return Batch(b.input_ids, pos, None, b.loss_mask, b.targets, b.n_tokens, b.n_samples)


def micro_batches(mine: list[list[Example]], layout: str, row_budget: int, grad_accum: int) -> list[Any]:
    """A rank's rows of a step cut into micro-batches: of samples regrouped by length (layout grouped: the same
    samples, micro-batches of similar lengths), or of rows, `grad_accum` of them."""
    if layout == "grouped":
        return group_by_length([e for row in mine for e in row], row_budget)
    per = max(1, math.ceil(len(mine) / grad_accum))
    return [mine[i : i + per] for i in range(0, len(mine), per)]


def group_by_length(examples: Sequence[Example], token_budget: int) -> list[list[Example]]:
    """A step's samples sorted by length and cut into rows of samples of similar length, each at most
    `token_budget` padded tokens (a longer sample gets a row of its own). The step's gradient is the sum over
    its samples, so grouping within the step changes no result, only how much padding is computed."""
    out: list[list[Example]] = []
    for ex in sorted(examples, key=len):
        if out and (len(out[-1]) + 1) * len(ex) <= token_budget:
            out[-1].append(ex)
        else:
            out.append([ex])
    return out


Layout = str  # "grouped" | "varlen" | "packed" | "padded"


def resolve_layout(layout: str, packing: bool, device: torch.device | str) -> Layout:
    """The layout a train job's `layout: auto` means on this device: variable-length attention over packed rows
    on CUDA (where PyTorch has the kernel), length-grouped padded rows elsewhere (on a CPU every padded or masked
    position costs as much as a real one, and a 4D mask costs more than the padding grouping leaves)."""
    if layout != "auto":
        return layout
    if not packing:
        return "padded"
    return "varlen" if torch.device(device).type == "cuda" and varlen_available() else "grouped"


_BOOL_KEEP: bool | None = None  # does the installed transformers take a boolean `logits_to_keep`?


def answer_logits(model: Any, batch: Batch) -> torch.Tensor:
    """Logits [K, V] at the answer positions only: the lm_head runs on K hidden states, not B*T."""
    kw: dict[str, Any] = dict(input_ids=batch.input_ids, position_ids=batch.position_ids)
    if batch.attention_mask is not None:
        kw["attention_mask"] = batch.attention_mask
        return _answer_logits(model, batch, kw)
    if batch.seq_lens is None:  # length-grouped rows: causal attention alone, no mask
        return _answer_logits(model, batch, kw)
    if not packed_ready(model):
        raise ValueError("a batch without an attention mask needs seq_lens and a model with packed attention")
    packed = Packed.from_lengths(batch.seq_lens, batch.input_ids.device)
    kw["qa_packed"] = packed
    with packed_forward(packed):
        return _answer_logits(model, batch, kw)


def _answer_logits(model: Any, batch: Batch, kw: dict[str, Any]) -> torch.Tensor:
    global _BOOL_KEEP
    if _BOOL_KEEP is not False:
        try:
            logits = model(**kw, logits_to_keep=batch.loss_mask, use_cache=False).logits
            _BOOL_KEEP = True
            return logits.reshape(-1, logits.shape[-1])
        except (IndexError, TypeError, RuntimeError):
            if _BOOL_KEEP:
                raise
            _BOOL_KEEP = False
    # Older transformers: the same logits from the last hidden states. Outside the `except` block on purpose:
    # the failed call's activations are freed before this forward runs.
    out = model(**kw, logits_to_keep=1, output_hidden_states=True, use_cache=False)
    return model.get_output_embeddings()(out.hidden_states[-1][batch.loss_mask])


def answer_loss_sum(model: Any, batch: Batch) -> torch.Tensor:
    """Sum of cross-entropy over the answer tokens of the batch (divide by the step's answer-token count)."""
    logits = answer_logits(model, batch)
    return F.cross_entropy(logits.float(), batch.targets, reduction="sum")


def per_token_losses(model: Any, batch: Batch) -> torch.Tensor:
    """Cross-entropy per answer token, in row-major order (for tests and curriculum scoring)."""
    logits = answer_logits(model, batch)
    return F.cross_entropy(logits.float(), batch.targets, reduction="none")
