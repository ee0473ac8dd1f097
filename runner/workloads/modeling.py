"""Model and tokenizer loading: a Hugging Face id, a local directory, or `tiny` — a small Qwen2 model and a
byte-level BPE tokenizer built offline, pretrained once and cached under $RUNNER_CACHE/tiny/<settings hash>/.
LoRA attach via PEFT.

The tiny base's pretraining (full-parameter) mixes two things, like a real base model: facts about every
built-in topic ("A rivet is a fastener.", loss on the category) and MCQ answering for the topics in
`builtin_data.BASE_TOPICS` only. A LoRA adapter on the other topics then has knowledge to build on and a
format to learn, and learns it in a minute on a CPU; from a random base it learns nothing.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch

from runner.spec.models import LoraSpec, ModelSpec, TinyModel
from runner.workloads.prompts import LETTERS, answer_text, format_prompt

TINY_VERSION = "tiny-v2"  # bump when the tokenizer, architecture or pretraining recipe changes
TINY_VOCAB = 4096
PRETRAIN_BATCH = 64
PRETRAIN_LR = 3e-3
FACTS_PER_STEP = 32  # knowledge sentences per pretraining step, next to the 64 MCQs


def runner_cache() -> Path:
    if os.environ.get("RUNNER_CACHE"):
        return Path(os.environ["RUNNER_CACHE"])
    return Path(os.environ.get("RUNNER_HOME", ".runner")) / "cache"


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    dev = torch.device(device)
    if name == "auto":
        return torch.bfloat16 if dev.type in ("cuda", "xpu") else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


# --- the offline tiny model ----------------------------------------------------------------------------


def build_tiny_tokenizer() -> Any:
    """Byte-level BPE trained on the built-in corpus: any text tokenizes; ' A'..' J' are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from runner.workloads.builtin_data import categories, corpus_text

    texts = [corpus_text()]
    for rec in categories(per_topic=60, seed=12345):
        texts.append(format_prompt(rec["question"], rec["choices"]) + answer_text(rec["answer"]))
    # Every answer letter after a space, often enough to be merged into one token.
    texts += ["Answer:" + "".join(answer_text(x) for x in LETTERS)] * 200
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB,
        min_frequency=2,
        special_tokens=["<|endoftext|>", "<|pad|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|pad|>")
    for x in LETTERS:
        if len(fast.encode(answer_text(x), add_special_tokens=False)) != 1:
            raise RuntimeError(f"tiny tokenizer splits {answer_text(x)!r}; the corpus must contain it more often")
    return fast


def build_tiny_model(tiny: TinyModel, vocab_size: int, pad_id: int, attn: str = "sdpa") -> Any:
    from transformers import AutoModelForCausalLM, Qwen2Config

    kv = tiny.heads // 2 if tiny.heads % 2 == 0 else tiny.heads
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.hidden_size * 4,
        num_hidden_layers=tiny.layers,
        num_attention_heads=tiny.heads,
        num_key_value_heads=kv,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        pad_token_id=pad_id,
        eos_token_id=pad_id - 1,
        bos_token_id=None,
    )
    cfg._attn_implementation = attn
    torch.manual_seed(tiny.seed)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)


def tiny_settings_hash(tiny: TinyModel) -> str:
    d = {
        "version": TINY_VERSION,
        "vocab": TINY_VOCAB,
        "batch": PRETRAIN_BATCH,
        "facts": FACTS_PER_STEP,
        "lr": PRETRAIN_LR,
        **tiny.model_dump(),
    }
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def knowledge_examples(tokenizer: Any) -> list[Any]:
    """'A rivet is a fastener.' for every word of every topic, loss on the category: the base knows the facts
    of all topics, but answers MCQs only for the base topics."""
    from runner.workloads.builtin_data import TOPICS, _article
    from runner.workloads.packing import Example

    out = []
    for cats in TOPICS.values():
        for cat, words in cats.items():
            for w in words:
                head = tokenizer.encode(f"{_article(w).capitalize()} {w} is {_article(cat)}")
                tail = tokenizer.encode(f" {cat}.", add_special_tokens=False)
                out.append(Example(ids=head + tail, label_start=len(head)))
    return out


def pretrain_tiny(model: Any, tokenizer: Any, tiny: TinyModel, log: Any = print) -> dict[str, Any]:
    """Full-parameter training on the MCQ format for the base topics: the base must know something for LoRA
    to build on. Returns facts for the cache's pretrain.json."""
    from runner.workloads.builtin_data import BASE_TOPICS, categories
    from runner.workloads.data import MCQ
    from runner.workloads.packing import answer_loss_sum, collate_packed, encode_mcq, pack_rows
    from runner.workloads.scoring import score_mcq

    if tiny.pretrain_steps == 0:
        return {"steps": 0}
    recs = [MCQ.from_dict(d, default_id=str(i)) for i, d in enumerate(categories(seed=1000 + tiny.seed, topics=BASE_TOPICS))]
    held = [MCQ.from_dict(d, default_id=str(i)) for i, d in enumerate(categories(per_topic=25, seed=2000 + tiny.seed, topics=BASE_TOPICS))]
    examples = [encode_mcq(tokenizer, r, 512) for r in recs]
    facts = knowledge_examples(tokenizer) if FACTS_PER_STEP else []
    rng = random.Random(tiny.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_LR, weight_decay=0.0)
    warm = max(1, tiny.pretrain_steps // 20)

    def lr_at(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, tiny.pretrain_steps - warm)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order: list[int] = []
    t0 = time.perf_counter()
    model.train()
    loss_val = float("nan")
    for step in range(tiny.pretrain_steps):
        if len(order) < PRETRAIN_BATCH:
            more = list(range(len(examples)))
            rng.shuffle(more)
            order += more
        pick, order = order[:PRETRAIN_BATCH], order[PRETRAIN_BATCH:]
        exs = [examples[i] for i in pick] + rng.sample(facts, min(len(facts), FACTS_PER_STEP))
        rows = pack_rows([len(e) for e in exs], 512)
        batch = collate_packed([[exs[i] for i in r] for r in rows], tokenizer.pad_token_id)
        loss = answer_loss_sum(model, batch) / len(batch.targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        loss_val = loss.item()
        if (step + 1) % 50 == 0 or step + 1 == tiny.pretrain_steps:
            log(f"tiny base pretraining: step {step + 1}/{tiny.pretrain_steps} loss {loss_val:.3f}")
    model.eval()
    probs = score_mcq(model, tokenizer, held, batch_size=64)
    acc = sum(int(probs[i].argmax()) == r.answer_index for i, r in enumerate(held)) / len(held)
    return {
        "steps": tiny.pretrain_steps,
        "final_loss": loss_val,
        "base_topics": BASE_TOPICS,
        "held_out_accuracy": acc,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_tiny_base(tiny: TinyModel, cache_dir: Path | None = None, log: Any = print) -> Path:
    """The cached tiny base directory (model + tokenizer), building it on first use.

    A lock file serialises concurrent builders; the model is written to a temp directory, fsynced, then
    renamed, so a directory under its final name is always complete.
    """
    root = (cache_dir or runner_cache()) / "tiny"
    root.mkdir(parents=True, exist_ok=True)
    key = tiny_settings_hash(tiny)
    final = root / key
    if (final / "pretrain.json").exists():
        return final
    with open(root / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "pretrain.json").exists():
            return final
        log(f"building the tiny base model (cached in {final}; later runs load it in a second)")
        threads = torch.get_num_threads()
        tmp = root / f".tmp-{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tok = build_tiny_tokenizer()
        model = build_tiny_model(tiny, len(tok), tok.pad_token_id)
        facts = pretrain_tiny(model, tok, tiny, log)
        torch.set_num_threads(threads)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        facts["settings"] = tiny.model_dump()
        (tmp / "pretrain.json").write_text(json.dumps(facts, indent=2) + "\n")
        for p in tmp.iterdir():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(tmp)
        if final.exists():  # a directory without pretrain.json: left by an older, interrupted layout
            shutil.rmtree(final)
        os.rename(tmp, final)
        _fsync_dir(root)
        if facts.get("steps"):
            log(
                f"tiny base ready: {facts['steps']} pretraining steps in {facts['seconds']} s, "
                f"{facts['held_out_accuracy']:.1%} on held-out questions of its topics ({', '.join(facts['base_topics'])})"
            )
        return final


# --- loading -------------------------------------------------------------------------------------------


def base_model_path(model_spec: ModelSpec, cache_dir: Path | None = None, log: Any = print) -> str:
    """Where the base weights come from: the tiny cache directory, a local directory, or a Hub id."""
    if model_spec.base == "tiny":
        return str(ensure_tiny_base(model_spec.tiny, cache_dir, log))
    return model_spec.base


def load_model_and_tokenizer(
    model_spec: ModelSpec, device: torch.device | str = "cpu", cache_dir: Path | None = None, log: Any = print
) -> tuple[Any, Any]:
    """Base model (eval mode, on `device`) and its tokenizer; the tokenizer gets a pad token if it has none."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = base_model_path(model_spec, cache_dir, log)
    local = Path(path).is_dir()
    if not local and model_spec.base != "tiny" and ("/" not in path or path.startswith((".", "/"))):
        raise FileNotFoundError(f"model.base {path!r}: no such directory, and it does not look like a Hub id")
    kw: dict[str, Any] = {}
    if model_spec.revision and not local:
        kw["revision"] = model_spec.revision
    hf_cache = None if local else str((cache_dir or runner_cache()) / "hf")
    tok = AutoTokenizer.from_pretrained(path, cache_dir=hf_cache, **kw)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    dtype = resolve_dtype(model_spec.dtype, device)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation=model_spec.attn_implementation, cache_dir=hf_cache, **kw
    )
    model.to(device)
    model.eval()
    if model_spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model, tok


def attach_lora(model: Any, lora: LoraSpec) -> Any:
    """Wrap the base in a PEFT LoRA model; only the adapter's weights require grad."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg)


def load_adapter(model: Any, adapter_dir: Path, trainable: bool = True) -> Any:
    """Base model + a saved adapter (a checkpoint's `adapter/`)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=trainable)


def count_params(model: Any) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


if __name__ == "__main__":  # build the tiny base: python -m runner.workloads.modeling
    path = ensure_tiny_base(TinyModel())
    print(path)
    sys.exit(0)
