"""Recipe: build the offline `tiny` base — train its byte-level BPE tokenizer, pretrain the model, cache both.

The pretraining (full-parameter) mixes two things, like a real base model: facts about every built-in topic
("A rivet is a fastener.", loss on the category) and MCQ answering for the topics in `data.builtin.BASE_TOPICS`
only. A LoRA adapter on the other topics then has knowledge to build on and a format to learn, and learns it in a
minute on a CPU; from a random base it learns nothing. Model loading runs `build` when a job names a tiny base
that is not cached yet; `python -m runner.workloads.recipes.pretrain_tiny` builds the default one.
"""

from __future__ import annotations

import fcntl
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

from runner.files import fsync_dir, fsync_tree
from runner.paths import runner_cache
from runner.spec.models import ModelSpec, TinyModel
from runner.workloads.model.tiny import (
    FACTS_PER_STEP,
    PRETRAIN_BATCH,
    PRETRAIN_LR,
    TINY_VOCAB,
    build_tiny_model,
    tiny_settings_hash,
)
from runner.workloads.scoring.prompts import LETTERS, answer_text, format_prompt


def build_tiny_tokenizer() -> Any:
    """Byte-level BPE trained on the built-in corpus: any text tokenizes; ' A'..' J' are single tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from runner.workloads.data.builtin import categories, corpus_text

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


def knowledge_examples(tokenizer: Any) -> list[Any]:
    """'A rivet is a fastener.' for every word of every topic, loss on the category: the base knows the facts
    of all topics, but answers MCQs only for the base topics."""
    from runner.workloads.data.builtin import TOPICS, _article
    from runner.workloads.training.packing import Example

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
    from runner.workloads.data.builtin import BASE_TOPICS, categories
    from runner.workloads.data.records import MCQ
    from runner.workloads.scoring.scorer import score_mcq
    from runner.workloads.training.packing import answer_loss_sum, collate_packed, encode_mcq, pack_rows

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
        model.save_pretrained(tmp, is_main_process=True)
        tok.save_pretrained(tmp)
        if not (tmp / "config.json").is_file():  # transformers skips the weights on a rank other than 0
            shutil.rmtree(tmp, ignore_errors=True)
            raise RuntimeError("the tiny base was not saved (built on a process other than rank 0); build it on "
                               "rank 0 first")
        facts["settings"] = tiny.model_dump()
        (tmp / "pretrain.json").write_text(json.dumps(facts, indent=2) + "\n")
        fsync_tree(tmp)
        if final.exists():  # a directory without pretrain.json: left by an older, interrupted layout
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(root)
        if facts.get("steps"):
            log(
                f"tiny base ready: {facts['steps']} pretraining steps in {facts['seconds']} s, "
                f"{facts['held_out_accuracy']:.1%} on held-out questions of its topics ({', '.join(facts['base_topics'])})"
            )
        return final


def build(model_spec: ModelSpec, cache_dir: Path | None = None, log: Any = print) -> Path:
    """The entry point model loading calls (see `model.loading.OFFLINE_BASES`)."""
    return ensure_tiny_base(model_spec.tiny, cache_dir, log)


if __name__ == "__main__":
    print(ensure_tiny_base(TinyModel()))
    sys.exit(0)
