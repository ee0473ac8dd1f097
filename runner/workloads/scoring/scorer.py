"""MCQ scoring: one forward pass per question reading the choice-letter logits at the answer position,
and an lm-eval style cross-check (log-likelihood of each choice's text, one sequence per choice).

The fast path right-pads each length-sorted batch and runs the decoder without an attention mask: with a
causal model a real token never attends to the pads after it, so the result is exact, SDPA can take its
flash kernel (`is_causal`), and the vocabulary projection runs only on each row's last real position.
Models whose logits are not a plain projection of the last hidden state take the left-padded path
(attention mask + position ids + `logits_to_keep=1`). Results stay on the device until one copy at the end.

On a CPU, where every padded token costs as much as a real one, models prepared with `enable_packed_attention`
take the packed path instead: a batch's prompts are concatenated into one row with position ids restarting per
prompt, and attention runs causally inside each prompt's own span (one SDPA call per prompt), so no compute is
spent on padding and the linear layers see one large matrix instead of many small ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch

from runner.workloads.model.packed_attention import Packed, packed_forward, packed_ready
from runner.workloads.scoring.prompts import LETTERS, prompter, strip_choice_prefix
from runner.workloads.serving.engines import engine_letter_logits, is_engine

Padding = Literal["auto", "right", "left", "packed"]
# Config attributes that mean the logits are not `lm_head(hidden)`: those models take the full forward.
_LOGIT_POSTPROCESSING = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def letter_token_ids(tokenizer: Any, n: int = len(LETTERS), prompt: Any = None) -> list[int]:
    """Token ids of the answer letters after a prompt of `prompt`'s style (plain: ' A', ' B', ...)."""
    return prompter(tokenizer, prompt).letter_ids[:n]


def encode_prompts(tokenizer: Any, items: Sequence[Any], prompt: Any = None) -> list[list[int]]:
    """Token ids of each item's prompt in `prompt`'s style (the same ids training puts before the answer)."""
    return prompter(tokenizer, prompt).encode(items)


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, int):
            return v
    return 0


def fast_path_parts(model: Any) -> tuple[Any, Any] | None:
    """(decoder, lm_head) when logits are exactly `lm_head(decoder(x).last_hidden_state)`, else None."""
    cfg = getattr(model, "config", None)
    if cfg is None or any(getattr(cfg, a, None) not in (None, 1, 1.0) for a in _LOGIT_POSTPROCESSING):
        return None
    try:
        decoder = model.get_decoder()
        head = model.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is model:
        return None
    return decoder, head


def length_batches(
    lengths: Sequence[int],
    batch_size: int,
    max_batch_tokens: int | None = None,
    batch_overhead_tokens: int = 1024,
) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest batch first (a batch that does not fit fails early).

    A batch holds at most `batch_size` rows and, when `max_batch_tokens` is set, at most that many padded tokens
    (a single longer sequence still gets a batch of its own). Cut points minimise padded tokens plus
    `batch_overhead_tokens` per batch (launch and small-matmul cost) by dynamic programming over the sorted
    lengths, so long questions go in short batches instead of padding a big batch to the longest one.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    n = len(lengths)
    if n == 0:
        return []
    order = np.argsort(-np.asarray(lengths, dtype=np.int64), kind="stable")
    L = np.asarray(lengths, dtype=np.int64)[order]
    cost = np.full(n + 1, np.inf)
    cost[0] = 0.0
    cut = np.zeros(n + 1, dtype=np.int64)
    for i in range(n):
        width = max(int(L[i]), 1)  # row i is the longest of any batch it starts
        k = min(batch_size, n - i)
        if max_batch_tokens is not None:
            k = max(1, min(k, max_batch_tokens // width))
        cand = cost[i] + batch_overhead_tokens + width * np.arange(1, k + 1)
        better = cand < cost[i + 1 : i + k + 1]
        cost[i + 1 : i + k + 1][better] = cand[better]
        cut[i + 1 : i + k + 1][better] = i
    bounds = []
    j = n
    while j > 0:
        bounds.append((int(cut[j]), j))
        j = int(cut[j])
    return [order[a:b].tolist() for a, b in reversed(bounds)]


def _stage(
    seqs: list[list[int]], batches: list[list[int]], pad: int, side: str, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Pad every batch on the host and copy them all to the device at once.

    Returns per batch: input ids [B, T], attention mask [B, T] and sequence lengths [B], all views into three
    device buffers: one transfer each instead of several per batch.
    """
    shapes = [(len(b), max(len(seqs[i]) for i in b)) for b in batches]
    total = sum(r * t for r, t in shapes)
    ids = np.full(total, pad, dtype=np.int64)
    att = np.zeros(total, dtype=np.int64)
    lens = np.asarray([len(seqs[i]) for b in batches for i in b], dtype=np.int64)
    off = 0
    for b, (rows, T) in zip(batches, shapes, strict=True):
        block_ids = ids[off : off + rows * T].reshape(rows, T)
        block_att = att[off : off + rows * T].reshape(rows, T)
        for r, i in enumerate(b):
            s = seqs[i]
            if side == "right":
                block_ids[r, : len(s)] = s
                block_att[r, : len(s)] = 1
            else:
                block_ids[r, T - len(s) :] = s
                block_att[r, T - len(s) :] = 1
        off += rows * T
    ids_d, att_d, lens_d = _to(ids, device), _to(att, device), _to(lens, device)
    out = []
    off = roff = 0
    for rows, T in shapes:
        out.append((
            ids_d[off : off + rows * T].view(rows, T),
            att_d[off : off + rows * T].view(rows, T),
            lens_d[roff : roff + rows],
        ))
        off += rows * T
        roff += rows
    return out


def _to(x: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(x)
    if device.type == "cuda":
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


PACKED_ROW_TOKENS = 4096  # a packed row's default length cap


def _packed_letter_logits(
    decoder: Any,
    head: Any,
    prompts: list[list[int]],
    letters: torch.Tensor,
    batch_size: int,
    max_batch_tokens: int | None,
    device: torch.device,
) -> torch.Tensor:
    """Letter logits [n, 10] with the prompts packed into rows of at most `batch_size` prompts / a token cap."""
    cap = max_batch_tokens or PACKED_ROW_TOKENS
    n_layers = len(decoder.layers)
    rows: list[list[int]] = [[]]
    used = 0
    for i, p in enumerate(prompts):
        if rows[-1] and (len(rows[-1]) >= batch_size or used + len(p) > cap):
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += len(p)
    results = []
    for row in rows:
        lens = [len(prompts[i]) for i in row]
        ids = _to(np.concatenate([np.asarray(prompts[i], dtype=np.int64) for i in row])[None], device)
        pos = _to(np.concatenate([np.arange(n, dtype=np.int64) for n in lens])[None], device)
        packed = Packed.from_lengths(lens, device, last_layer=n_layers - 1)
        with packed_forward(packed):
            hidden = decoder(input_ids=ids, position_ids=pos, use_cache=False, qa_packed=packed).last_hidden_state
        results.append(head(hidden[0, packed.ends]).index_select(-1, letters).float())
    return torch.cat(results)


@torch.no_grad()
def letter_logits(
    model: Any,
    tokenizer: Any,
    items: Sequence[Any],
    batch_size: int = 32,
    *,
    padding: Padding = "auto",
    max_batch_tokens: int | None = None,
    max_length: int | None = None,
    prompt: Any = None,
) -> torch.Tensor:
    """Raw logits of ' A'..' J' at the answer position, shape [len(items), 10], on the model's device.

    Letters past an item's number of choices are -inf. `max_length` keeps the last tokens of longer prompts
    (the answer position survives). `padding`: `right` (mask-free, fast), `left` (mask + position ids),
    `auto` (right when the model allows it).
    """
    if batch_size < 1:
        raise ValueError("batch_size must be >= 1")
    device = _device(model)
    n_letters = len(LETTERS)
    out = torch.full((len(items), n_letters), float("-inf"), device=device)
    if not items:
        return out
    n_choices = [len(it.choices) for it in items]
    for i, n in enumerate(n_choices):
        if not 2 <= n <= n_letters:
            raise ValueError(f"item {i} has {n} choices; scoring supports 2-{n_letters}")
    fmt = prompter(tokenizer, prompt)
    letters = torch.tensor(fmt.letter_ids, device=device)
    prompts = fmt.encode(items)
    if max_length is not None:
        prompts = [p[-max_length:] for p in prompts]
    if is_engine(model):  # vLLM or llama.cpp: the same prompt and letter ids, scored by the engine
        return engine_letter_logits(model, prompts, fmt.letter_ids, n_choices, n_letters).to(device)
    parts = fast_path_parts(model) if padding in ("auto", "right", "packed") else None
    if padding in ("right", "packed") and parts is None:
        raise ValueError(f"{padding} padding needs a model whose logits are lm_head(last hidden state)")
    if padding == "packed" and not packed_ready(model):
        raise ValueError("packed scoring needs a model prepared with enable_packed_attention")
    packed = parts is not None and packed_ready(model) and (padding == "packed" or device.type == "cpu")
    side = "right" if parts is not None else "left"
    choice_mask = _to(np.arange(n_letters)[None, :] >= np.asarray(n_choices)[:, None], device)
    pad = _pad_id(tokenizer)
    was_training = model.training
    model.eval()
    try:
        if packed:
            assert parts is not None
            out[:] = _packed_letter_logits(*parts, prompts, letters, batch_size, max_batch_tokens, device)
            return out.masked_fill(choice_mask, float("-inf"))
        graphs = getattr(model, "_qa_cuda_graphs", None) if parts is not None else None
        batches = length_batches([len(p) for p in prompts], batch_size, max_batch_tokens)
        order = _to(np.asarray([i for b in batches for i in b], dtype=np.int64), device)
        results = []
        for ids, att, lens in _stage(prompts, batches, pad, side, device):
            if parts is not None:
                decoder, head = parts
                last = graphs(ids, lens) if graphs is not None else None  # recorded forward (CUDA graphs)
                if last is None:
                    hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
                    last = hidden[torch.arange(ids.shape[0], device=device), lens - 1]
                logits = head(last)
            else:
                pos = (att.cumsum(-1) - 1).clamp(min=0)
                logits = model(
                    input_ids=ids, attention_mask=att, position_ids=pos, logits_to_keep=1, use_cache=False
                ).logits[:, -1, :]
            results.append(logits.index_select(-1, letters).float())
        out[order] = torch.cat(results)
    finally:
        if was_training:
            model.train()
    return out.masked_fill(choice_mask, float("-inf"))


@torch.no_grad()
def score_mcq(
    model: Any,
    tokenizer: Any,
    items: Sequence[Any],
    batch_size: int = 32,
    *,
    padding: Padding = "auto",
    max_batch_tokens: int | None = None,
    max_length: int | None = None,
    prompt: Any = None,
) -> torch.Tensor:
    """Letter probabilities, shape [len(items), 10] on the CPU: softmax over each item's own letters, zero elsewhere.

    `items` have `.question` and `.choices` (MCQ records). One forward pass per question, batches sorted by
    length; results come back in the input order with a single device-to-host copy.
    """
    logits = letter_logits(
        model, tokenizer, items, batch_size, padding=padding, max_batch_tokens=max_batch_tokens,
        max_length=max_length, prompt=prompt,
    )
    return logits.softmax(-1).cpu()


@torch.no_grad()
def score_mcq_per_choice(
    model: Any,
    tokenizer: Any,
    items: Sequence[Any],
    batch_size: int = 32,
    *,
    normalize: Literal["none", "chars"] = "none",
    max_batch_tokens: int | None = None,
    prompt: Any = None,
) -> torch.Tensor:
    """lm-eval style cross-check: choice probabilities [len(items), 10] from the log-likelihood of each choice's text.

    Each choice is one sequence: the prompt, then ' ' + the choice text; its score is the summed log-probability
    of the choice's tokens (`normalize="chars"` divides by the text's length, lm-eval's acc_norm). The scores are
    softmaxed over each item's choices so the result compares directly with `score_mcq`.
    """
    device = _device(model)
    n_letters = len(LETTERS)
    scores = torch.full((len(items), n_letters), float("-inf"), device=device)
    if not items:
        return scores.cpu()
    fmt = prompter(tokenizer, prompt)
    contexts = fmt.encode(items)
    seqs: list[list[int]] = []
    starts: list[int] = []  # index of the first continuation token
    owners: list[tuple[int, int]] = []
    denom: list[float] = []
    for i, it in enumerate(items):
        for j, choice in enumerate(it.choices):
            cont = fmt.choice_ids(choice) or [_pad_id(tokenizer)]
            seqs.append(contexts[i] + cont)
            starts.append(len(contexts[i]))
            owners.append((i, j))
            denom.append(float(len(strip_choice_prefix(choice)) + 1) if normalize == "chars" else 1.0)
    parts = fast_path_parts(model)
    pad = _pad_id(tokenizer)
    flat = torch.full((len(seqs),), float("-inf"), device=device)
    was_training = model.training
    model.eval()
    try:
        batches = length_batches([len(s) for s in seqs], batch_size, max_batch_tokens)
        for idx, (ids, att, _) in zip(batches, _stage(seqs, batches, pad, "right", device), strict=True):
            # Positions predicting each continuation token: start-1 .. len-2; targets: start .. len-1.
            rows_np, pos_np = [], []
            for r, k in enumerate(idx):
                p = np.arange(starts[k] - 1, len(seqs[k]) - 1)
                rows_np.append(np.full(len(p), r))
                pos_np.append(p)
            r_t = _to(np.concatenate(rows_np), device)
            p_t = _to(np.concatenate(pos_np), device)
            if parts is not None:
                decoder, head = parts
                hidden = decoder(input_ids=ids, use_cache=False).last_hidden_state
                logits = head(hidden[r_t, p_t])
            else:
                logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[r_t, p_t]
            logp = logits.float().log_softmax(-1).gather(-1, ids[r_t, p_t + 1].unsqueeze(-1)).squeeze(-1)
            seq_of = r_t
            total = torch.zeros(len(idx), device=device).index_add_(0, seq_of, logp)
            flat[_to(np.asarray(idx, dtype=np.int64), device)] = total
    finally:
        if was_training:
            model.train()
    owner_i = _to(np.asarray([o[0] for o in owners], dtype=np.int64), device)
    owner_j = _to(np.asarray([o[1] for o in owners], dtype=np.int64), device)
    scores[owner_i, owner_j] = flat / torch.tensor(denom, device=device)
    return scores.softmax(-1).cpu()


def compile_decoder_layers(model: Any) -> bool:
    """Compile each decoder layer with dynamic shapes (regional compilation: one graph serves every layer).

    Fuses the elementwise work between the matmuls (RMSNorm in fp32, rotary, SiLU*up). Returns False when the
    model has no `layers` list to compile; the first batches after this pay the compile time.
    """
    try:
        layers = model.get_decoder().layers
    except AttributeError:
        return False
    for layer in layers:
        layer.compile(dynamic=True)
    return True
