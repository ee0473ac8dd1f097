"""The `eval` workload: score models on MCQ data and write eval.json, report.md and a reliability diagram.

A target is a base model, a run's checkpoint (base from the run's job.yaml + its LoRA adapter) or a registry
version; `models: [...]` scores several and combines them (probability mean and majority vote), each member
reported beside the ensemble. Accuracy comes with breakdowns (topic, source, difficulty), ECE, Brier and NLL;
optionally the letter-prior bias and cyclic-permutation debiasing, and an lm-eval style cross-check.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from runner.workloads.model.packed_attention import enable_packed_scoring
from runner.workloads.scoring.calibration import cyclic_debias, letter_bias
from runner.workloads.scoring.prompts import LETTERS, resolve_prompt
from runner.workloads.scoring.report import write_outputs
from runner.workloads.scoring.scorer import compile_decoder_layers, score_mcq, score_mcq_per_choice
from runner.workloads.scoring.summary import ensemble, predictions, summarize, vote_probs


class EvalError(Exception):
    """A problem the user can fix (unknown run, missing checkpoint, bad data): printed as one line."""


# --- metrics -------------------------------------------------------------------------------------------


# --- targets -------------------------------------------------------------------------------------------


def _adapter_dir(checkpoint: Path) -> Path:
    for d in (checkpoint / "adapter", checkpoint):
        if (d / "adapter_config.json").is_file():
            return d
    raise EvalError(f"{checkpoint} holds no PEFT adapter (adapter_config.json); is it a LoRA training checkpoint?")


def load_member(member: Any, device: str, log: Any = print) -> tuple[Any, Any, dict[str, Any]]:
    """(model in eval mode, tokenizer, what it is) for one eval target."""
    from runner.spec.models import ModelSpec
    from runner.workloads.model.loading import load_adapter, load_model_and_tokenizer
    from runner.workloads.scoring.prompts import remember_prompt

    if member.model is not None:
        try:
            model, tok = load_model_and_tokenizer(member.model, device, log=log)
        except OSError as e:  # a base that is missing, unreadable, or an offline base that cannot be built
            raise EvalError(f"model.base {member.model.base!r}: {e}") from None
        return model, tok, {"type": "model", "base": member.model.base}
    if member.run is not None:
        from runner.registry import RegistryError, select_checkpoint
        from runner.runs import RunError, RunStore

        try:
            run = RunStore().get(member.run)
            ck = select_checkpoint(run, member.checkpoint)
        except (RunError, RegistryError) as e:
            raise EvalError(f"run: {e}") from None
        job_data = run.job_data()
        if not isinstance(job_data.get("model"), dict):
            raise EvalError(f"run {run.ref}: its job.yaml names no `model`; only training runs can be evaluated")
        spec = ModelSpec.model_validate(job_data["model"]).model_copy(update={"gradient_checkpointing": False})
        adapter = _adapter_dir(ck)
        base, tok = load_model_and_tokenizer(spec, device, log=log)
        model = load_adapter(base, adapter, trainable=False)
        model.eval()
        remember_prompt(model, adapter)
        return model, tok, {
            "type": "run", "run": run.ref, "run_id": run.id, "checkpoint": ck.name, "checkpoint_selector":
            member.checkpoint, "checkpoint_path": os.path.realpath(ck), "base": spec.base,
        }
    from runner.registry import RegistryError
    from runner.workloads.model.artifact import load_artifact

    try:
        model, tok, manifest = load_artifact(member.registry, device)
    except RegistryError as e:
        raise EvalError(f"registry: {e}") from None
    return model, tok, {
        "type": "registry", "ref": member.registry, "name": manifest.get("name"), "version": manifest.get("version"),
        "source": manifest.get("source"),
    }


def member_label(member: Any, info: dict[str, Any], i: int) -> str:
    if getattr(member, "name", None):
        return str(member.name)
    if info["type"] == "run":
        return f"{info['run']}:{info['checkpoint']}"
    if info["type"] == "registry":
        return f"{info['name']}:v{info['version']}"
    return f"{info['base']}" if i == 0 else f"{info['base']}#{i}"


# --- the job -------------------------------------------------------------------------------------------


def load_records(spec: Any) -> list[Any]:
    from runner.workloads.data.records import DataError
    from runner.workloads.data.sets import load_sources, subsample

    try:
        records = load_sources(spec.data, seed=spec.seed, base_dir=Path.cwd())
    except DataError as e:
        raise EvalError(str(e)) from None
    except FileNotFoundError as e:
        raise EvalError(f"data: {e}") from None
    if spec.limit is not None:
        records = subsample(records, spec.limit, spec.seed)
    if not records:
        raise EvalError("data: the sources hold no questions")
    seen: Counter[str] = Counter()
    for r in records:  # paired tests match questions by id: ids must be unique
        seen[r.id] += 1
        if seen[r.id] > 1:
            r.id = f"{r.id}#{seen[r.id]}"
    return records


def eval_set_id(records: Sequence[Any]) -> str:
    """Identifies the question set (the registry's promotion gate compares evals on the same set)."""
    from runner.registry import ids_set_id

    return ids_set_id([r.id for r in records])


def _device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise EvalError("device: cuda requested but no GPU is visible; set device: auto or cpu")
    return name


PROGRESS_EVERY_S = 10.0  # a progress line at most this often


def in_chunks(fn: Any, items: Sequence[Any], log: Any, what: str, chunk: int) -> torch.Tensor:
    """`fn(items)` in chunks of `chunk` items, logging done/total, questions/s and the ETA every
    PROGRESS_EVERY_S seconds: a long eval on a slow device says how far it is. One call when it all fits."""
    if len(items) <= chunk:
        return fn(items)
    parts, t0, last = [], time.perf_counter(), time.perf_counter()
    for i in range(0, len(items), chunk):
        parts.append(fn(items[i:i + chunk]))
        now, done = time.perf_counter(), min(i + chunk, len(items))
        if done < len(items) and now - last >= PROGRESS_EVERY_S:
            rate = done / max(now - t0, 1e-9)
            log(f"  {what}: {done}/{len(items)} questions, {rate:.1f} q/s, ETA {(len(items) - done) / rate:.0f} s")
            last = now
    return torch.cat(parts)


def score_member(model: Any, tok: Any, records: Sequence[Any], spec: Any, log: Any = print,
                 prompt: Any = None) -> dict[str, Any]:
    """Score one model: letters and/or per-choice, optional bias and debiasing; returns tensors and facts."""
    sc, cal = spec.scoring, spec.calibration

    def letters(items: Sequence[Any]) -> torch.Tensor:
        return score_mcq(model, tok, items, sc.batch_size, max_batch_tokens=sc.max_batch_tokens,
                         max_length=sc.max_length, prompt=prompt)

    if sc.compile and next(model.parameters()).device.type == "cuda":
        compile_decoder_layers(model)
    out: dict[str, Any] = {"timing": {}}
    if sc.method in ("letters", "both"):
        t0 = time.perf_counter()
        out["probs"] = in_chunks(letters, records, log, "letters", max(256, 8 * sc.batch_size))
        dt = time.perf_counter() - t0
        out["timing"]["letters_s"] = round(dt, 3)
        out["timing"]["questions_per_s"] = round(len(records) / max(dt, 1e-9), 1)
    if sc.method in ("per_choice", "both"):
        t0 = time.perf_counter()
        pc = in_chunks(lambda items: score_mcq_per_choice(
            model, tok, items, sc.batch_size, normalize=sc.normalize, prompt=prompt,
            max_batch_tokens=sc.max_batch_tokens), records, log, "per-choice", max(64, 2 * sc.batch_size))
        dt = time.perf_counter() - t0
        out["timing"]["per_choice_s"] = round(dt, 3)
        if sc.method == "per_choice":
            out["probs"] = pc
            out["timing"]["questions_per_s"] = round(len(records) / max(dt, 1e-9), 1)
        else:
            agree = float((pc.argmax(-1) == out["probs"].argmax(-1)).float().mean())
            out["cross_check"] = {
                "agreement": agree, "per_choice": summarize(records, pc, cal.bins),
                "speedup_vs_per_choice": round(dt / max(out["timing"]["letters_s"], 1e-9), 2),
            }
            out["cross_check"]["per_choice"].pop("reliability")
            out["per_choice_pred"] = pc.argmax(-1)
            log(f"  per-choice cross-check: agreement {agree:.1%}, letters method {out['cross_check']['speedup_vs_per_choice']}x faster")
    score_fn = letters if sc.method != "per_choice" else (
        lambda items: score_mcq_per_choice(model, tok, items, sc.batch_size, normalize=sc.normalize, prompt=prompt,
                                           max_batch_tokens=sc.max_batch_tokens))
    gold = [LETTERS.index(r.answer) for r in records]
    if cal.letter_bias:
        out["letter_bias"] = letter_bias(score_fn, records, gold)
        lb = out["letter_bias"]
        log("  letter bias: " + ", ".join(f"{k} {v['accuracy']:.1%}" for k, v in lb["accuracy_by_position"].items())
            + f" (spread {lb['spread']:.1%}, {lb['cost']['seconds']:.1f} s)")
    if cal.debias:
        debiased, cost = cyclic_debias(score_fn, records)
        out["plain_probs"] = out["probs"]
        out["probs"] = debiased
        out["debias"] = {"method": "cyclic", "cost": cost,
                         "plain_accuracy": float((out["plain_probs"].argmax(-1) == torch.tensor(gold)).float().mean())}
        log(f"  debiased over cyclic shifts: {cost['passes']} passes, {cost['seconds']:.1f} s")
    return out


def _member_result(label: str, info: dict[str, Any], scored: dict[str, Any], records: Sequence[Any], bins: int) -> dict[str, Any]:
    res = {"label": label, "target": info, **summarize(records, scored["probs"], bins), "timing": scored["timing"]}
    for k in ("cross_check", "letter_bias", "debias"):
        if k in scored:
            res[k] = scored[k]
    return res


def evaluate(spec: Any, run_dir: Path, log: Any = print) -> dict[str, Any]:
    """Run the whole eval; write eval.json, report.md, reliability.png; return the eval.json object."""
    t_start = time.perf_counter()
    device = _device(spec.device)
    if spec.threads:
        torch.set_num_threads(spec.threads)
    records = load_records(spec)
    log(f"{len(records)} questions from {len(spec.data)} source(s); device {device}")
    members = spec.members()
    results: list[dict[str, Any]] = []
    member_probs: list[torch.Tensor] = []
    extras: dict[str, torch.Tensor] = {}
    for i, member in enumerate(members):
        t0 = time.perf_counter()
        model, tok, info = load_member(member, device, log=log)
        enable_packed_scoring(model, device)
        label = member_label(member, info, i)
        style = resolve_prompt(member.prompt if member.prompt is not None else spec.prompt, model, warn=log)
        info["prompt"] = style.to_dict()
        log(f"[{i + 1}/{len(members)}] {label}: loaded in {time.perf_counter() - t0:.1f} s; prompt style {style}")
        try:
            scored = score_member(model, tok, records, spec, log=log, prompt=style)
        except ValueError as e:  # a prompt style this tokenizer cannot take (no chat template, split letters)
            raise EvalError(f"{label}: {e}") from None
        res = _member_result(label, info, scored, records, spec.calibration.bins)
        log(f"  accuracy {res['accuracy']:.2%} (n={res['n']}), ECE {res['ece']:.3f}, Brier {res['brier']:.3f}, "
            f"{scored['timing'].get('questions_per_s', 0)} questions/s")
        results.append(res)
        member_probs.append(scored["probs"])
        if len(members) == 1:
            if "plain_probs" in scored:
                extras["plain_probs"] = scored["plain_probs"]
            if "per_choice_pred" in scored:
                extras["per_choice_pred"] = scored["per_choice_pred"]
        del model
        if device == "cuda":
            torch.cuda.empty_cache()

    bins = spec.calibration.bins
    out: dict[str, Any] = {
        "format": 1,
        "job": spec.name,
        "eval_set": eval_set_id(records),
        "data": [s.model_dump(mode="json") for s in spec.data],
        "method": spec.scoring.method,
        "device": device,
    }
    if len(members) == 1:
        main = results[0]
        out.update({k: v for k, v in main.items() if k not in ("label",)})
        out["label"] = main["label"]
        final_probs = member_probs[0]
    else:
        mean, vote = ensemble(member_probs)
        by_mean = summarize(records, mean, bins)
        by_vote = summarize(records, vote_probs(vote, mean), bins)
        chosen = by_mean if spec.ensemble == "mean" else by_vote
        final_probs = mean if spec.ensemble == "mean" else vote_probs(vote, mean)
        out.update(chosen)
        out["label"] = f"ensemble ({spec.ensemble}) of {len(members)}"
        out["target"] = {"type": "ensemble", "method": spec.ensemble, "members": [r["target"] for r in results]}
        preds = torch.stack([p.argmax(-1) for p in member_probs])
        out["ensemble"] = {
            "method": spec.ensemble,
            "mean": {k: by_mean[k] for k in ("n", "accuracy", "ece", "brier", "by_difficulty")},
            "vote": {k: by_vote[k] for k in ("n", "accuracy", "ece", "brier", "by_difficulty")},
            "members_agree": float((preds == preds[0]).all(0).float().mean()),
            "oracle_accuracy": float((preds == torch.tensor([LETTERS.index(r.answer) for r in records])).any(0).float().mean()),
        }
        out["members"] = results
        extras = {"vote": vote, "mean_pred": mean.argmax(-1)}
    out["seconds"] = round(time.perf_counter() - t_start, 1)
    if spec.predictions:
        out["predictions"] = predictions(records, final_probs, extras)
    write_outputs(out, run_dir)
    return out


# --- outputs -------------------------------------------------------------------------------------------


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def run(job: Any, run_dir: Path) -> int:
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        out = evaluate(job.spec, run_dir, log=lambda m: print(m, flush=True))
    except EvalError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("cancelled", file=sys.stderr, flush=True)
        return 130
    lo, hi = out["accuracy_ci95"]
    print(f"accuracy {out['accuracy']:.2%} (95% CI {lo:.1%}-{hi:.1%}, n={out['n']}), ECE {out['ece']:.3f}, "
          f"Brier {out['brier']:.3f} -> {run_dir / 'eval.json'}, {run_dir / 'report.md'}", flush=True)
    return 0
