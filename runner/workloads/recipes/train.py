"""The `train` job kind: LoRA fine-tuning on MCQ data, one loop from setup to the last checkpoint.

Setup (data, model, adapter, optimizer) -> resume from the last complete checkpoint if the run directory has
one -> validate at step 0 -> train (packed rows, answer-token loss, gradient accumulation) with periodic
validation and checkpoints -> final validation and checkpoint. SIGTERM/SIGINT finish the current step, save
a checkpoint and exit 130.

Checkpoints: `checkpoints/step-NNNNNNNN/` with `adapter/` (PEFT), `tokenizer/`, `optimizer.pt`,
`scheduler.pt`, `rng.pt`, `manifest.json` (size and sha256 of every file) and, last, `trainer_state.json`
(step, validation accuracy, base model, sample-stream state). Each is written to `checkpoints/.tmp-step-...`,
fsynced and renamed. A resume checks the newest against its manifest and passes over a damaged one (renamed
`damaged-step-N`) for the newest intact one. `checkpoints/best` is a relative symlink to the best one by
validation accuracy (a finite one). A non-finite loss or gradient norm stops the run as failed, or with
`train.on_nonfinite: skip` skips that step's update (see training/nonfinite.py).
"""

from __future__ import annotations

import json
import math
import random
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from runner.files import atomic_write
from runner.paths import runner_cache
from runner.workloads.data.curriculum import DIFFICULTY_LEVEL, StepComposer, curriculum_order
from runner.workloads.data.records import MCQ, DataError
from runner.workloads.data.sets import dedupe, load_sources, train_val_records
from runner.workloads.model.compiled import compile_layers
from runner.workloads.model.fused_lora import fuse_lora
from runner.workloads.model.loading import attach_lora, base_model_path, load_model_and_tokenizer
from runner.workloads.model.packed_attention import enable_packed_attention
from runner.workloads.scoring.prompts import PLAIN, PromptStyle, prompter
from runner.workloads.scoring.scorer import score_mcq
from runner.workloads.training.checkpointing import Checkpointing
from runner.workloads.training.integrity import CheckpointError
from runner.workloads.training.nonfinite import NonFiniteError, NonFiniteGuard
from runner.workloads.training.packing import (
    Example,
    answer_loss_sum,
    collate_grouped,
    collate_packed,
    collate_padded,
    encode_mcq,
    micro_batches,
    per_token_losses,
    resolve_layout,
)
from runner.workloads.training.placement import collective_failure, placement
from runner.workloads.training.progress import (
    Metrics,
    ProgressView,
    _null,
    first_val_row,
    gain_report,
    peak_flops,
    quiet_libraries,
    stop_reason,
    write_step0_predictions,
)
from runner.workloads.training.schedule import lr_lambda
from runner.workloads.training.sharding import (
    even_micro_batches,
    no_gradient_sync,
    shard_decoder_layers,
    total_grad_norm,
)

EXIT_CANCELLED = 130
# A scheduler signals every process of a job step and the launcher forwards the signal to its ranks again: a second
# signal this soon after the first is the same request twice; a later one means stop at once.
REPEATED_SIGNAL_S = 5.0


# --- the loop ------------------------------------------------------------------------------------------


class Trainer(Checkpointing):
    """One training run; the methods are the stages of `run`, top to bottom (checkpoints: Checkpointing)."""

    def __init__(self, job: Any, run_dir: Path):
        self.job = job
        self.spec = job.spec
        self.run_dir = run_dir
        self.ckpt_dir = run_dir / "checkpoints"
        self.stop_signal: int | None = None
        self.stop_since = 0.0  # time.monotonic() of the first stop request (this rank's signal or another's)

    # setup ------------------------------------------------------------------------------------------

    def setup(self) -> None:
        from accelerate import Accelerator

        t = self.spec.train
        if t.threads:
            torch.set_num_threads(t.threads)
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        random.seed(t.seed)
        np.random.seed(t.seed)
        torch.manual_seed(t.seed)
        from datetime import timedelta

        from accelerate.utils import InitProcessGroupKwargs

        # A rank that dies leaves the others in a collective: they fail after this timeout instead of hanging.
        timeout = timedelta(seconds=self.spec.resources.collective_timeout_s)
        res = self.spec.resources
        # CPU ranks (gpus: 0, several processes) join over gloo; accelerate's launcher starts them like GPU ranks.
        cpu_ranks = res.gpus == 0 and res.world_size() > 1
        self.acc = Accelerator(cpu=cpu_ranks, kwargs_handlers=[InitProcessGroupKwargs(timeout=timeout)])
        if self.acc.num_processes != res.world_size() and res.world_size() > 1:
            raise DataError(f"resources ask for {res.world_size()} ranks but {self.acc.num_processes} started: "
                            "launch with the run's plan/accelerate.yaml (`runner run` does)")
        self.main = self.acc.is_main_process
        self.device = self.acc.device
        if self.acc.num_processes > 1:
            self.log(placement(self.acc))
        self.metrics = Metrics(
            self.run_dir / "metrics.jsonl",
            self.main,
            self.run_dir / "tensorboard" if self.spec.logging.tensorboard else None,
        )

        d = self.spec.data
        self.train_recs, self.val_recs, _ = train_val_records(d, base_dir=Path.cwd())
        if not self.val_recs:
            raise DataError("no validation records: set data.val or a data.val_fraction > 0")
        replay = load_sources(d.replay.sources, seed=d.seed, max_bad_rows=d.max_bad_rows, base_dir=Path.cwd())
        replay, _ = dedupe(replay, exclude=self.val_recs)  # replaying validation questions would inflate it
        self.log(
            f"data: {len(self.train_recs)} train, {len(self.val_recs)} validation, {len(replay)} replay records"
        )

        # An offline base (tiny, smollm2) is built on first use: by the main process, while the other ranks wait
        # (transformers writes model weights only on rank 0 once torch.distributed is up).
        with self.acc.main_process_first():
            self.base_path = base_model_path(self.spec.model, runner_cache(), self.log)
            model, self.tok = load_model_and_tokenizer(self.spec.model, self.device, runner_cache(), self.log)
        self.prompt = PromptStyle.of(self.spec.prompt)
        try:
            prompter(self.tok, self.prompt)
        except ValueError as e:
            raise DataError(str(e)) from None
        if self.prompt != PLAIN:
            self.log(f"prompt style: {self.prompt}")
        L = t.max_seq_len
        self.train_ex = [encode_mcq(self.tok, r, L, prompt_style=self.prompt) for r in self.train_recs]
        scores = self.base_losses(model) if d.curriculum.order == "loss" else None
        if d.replay.self_replay:
            replay += self.base_correct(model)
        self.replay_recs = replay
        self.replay_ex = [encode_mcq(self.tok, r, L, prompt_style=self.prompt) for r in replay]

        torch.manual_seed(t.seed)  # the adapter's init must not depend on whether the base came from a cache
        self.layout = resolve_layout(t.layout, t.packing, self.device)
        if self.layout == "varlen" and not enable_packed_attention(model):
            raise DataError(f"train.layout varlen: {self.spec.model.base} has no attention the packed path can "
                            "take (it needs SDPA and full attention in every layer); use layout grouped")
        model = attach_lora(model, self.spec.lora)
        speed = [f"layout {self.layout}"]
        if t.fused_lora:
            speed.append(f"fused LoRA in {fuse_lora(model)} layers")
        if t.compile and self.layout != "varlen":
            speed.append(f"torch.compile of {compile_layers(model)} decoder layers (the first steps compile)")
        self.log("training: " + ", ".join(speed))
        self.n_params = sum(p.numel() for p in model.parameters())
        trainable = [p for p in model.parameters() if p.requires_grad]
        self.log(f"model: {self.spec.model.base} ({self.n_params / 1e6:.1f}M params, "
                 f"{sum(p.numel() for p in trainable) / 1e6:.2f}M trainable LoRA r={self.spec.lora.r})")
        # strategy fsdp on CPU ranks: the trainer shards the decoder layers itself (FSDP2), before the optimizer
        # is made, so the optimizer holds the shards (training/sharding.py).
        self.sharded = res.strategy == "fsdp" and cpu_ranks
        self.fsdp_layers: list[Any] = []
        if self.sharded:  # a model it cannot shard is a ValueError: one error line, exit 1
            self.fsdp_layers = shard_decoder_layers(model, self.acc.num_processes, self.log)
            trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
        self.model, self.opt = (model, opt) if self.sharded else self.acc.prepare(model, opt)

        # Token budget per optimizer step -> rows per step (packed) or samples per step (unpacked).
        world = self.acc.num_processes
        mean_len = sum(len(e) for e in self.train_ex) / len(self.train_ex)
        per_micro = t.batch_size * (L if t.packing else mean_len)
        self.grad_accum = max(1, math.ceil(t.tokens_per_step / (per_micro * world))) if t.tokens_per_step else t.grad_accum
        self.rows_per_step = t.batch_size * self.grad_accum * world
        order = curriculum_order([r.difficulty for r in self.train_recs], d.curriculum, d.seed, scores)
        self.composer = StepComposer(
            [len(e) for e in self.train_ex],
            order,
            [len(e) for e in self.replay_ex],
            curriculum=d.curriculum,
            replay_fraction=d.replay.fraction,
            rows=self.rows_per_step,
            row_len=L,
            packing=t.packing,
            total_steps=t.steps,
            seed=d.seed,
        )
        self.flops_peak = peak_flops(self.device)
        self.dtype = next(self.model.parameters()).dtype
        self.row_budget = t.batch_size * L  # padded tokens per micro-batch in the grouped layout

    def base_losses(self, model: Any) -> list[float]:
        """Base-model answer loss per training record (curriculum order `loss`), computed once per run dir."""
        cache = self.run_dir / "curriculum_scores.json"
        ids = [r.id for r in self.train_recs]
        if cache.exists():
            saved = json.loads(cache.read_text())
            if saved.get("ids") == ids:
                return [float(x) for x in saved["losses"]]
        self.log(f"scoring {len(ids)} training questions with the base model for the curriculum")
        losses: list[float] = []
        with torch.no_grad():
            for s in range(0, len(self.train_ex), 32):
                chunk = self.train_ex[s : s + 32]
                batch = collate_padded(chunk, self.tok.pad_token_id).to(self.device)
                per_tok = per_token_losses(model, batch).cpu().tolist()
                o = 0
                for ex in chunk:
                    k = len(ex) - ex.label_start
                    losses.append(sum(per_tok[o : o + k]) / k)
                    o += k
        if self.main:
            atomic_write(cache, json.dumps({"ids": ids, "losses": losses}))
        return losses

    def base_correct(self, model: Any) -> list[MCQ]:
        """Self-replay: training questions the base model already answers correctly."""
        probs = score_mcq(model, self.tok, self.train_recs, batch_size=64, prompt=self.prompt)
        keep = [r for i, r in enumerate(self.train_recs) if int(probs[i].argmax()) == r.answer_index]
        self.log(f"self-replay: the base answers {len(keep)}/{len(self.train_recs)} training questions correctly")
        return keep

    def log(self, msg: str) -> None:
        if getattr(self, "main", True):
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        if getattr(self, "main", True):
            print(f"warning: {msg}", file=sys.stderr, flush=True)

    # validation -------------------------------------------------------------------------------------

    def validate(self, step: int) -> dict[str, Any]:
        t0 = time.perf_counter()
        probs = score_mcq(self.acc.unwrap_model(self.model), self.tok, self.val_recs, batch_size=64,
                          prompt=self.prompt)
        gold = torch.tensor([r.answer_index for r in self.val_recs])
        pred = probs.argmax(-1)
        correct = (pred == gold).float()
        # Non-finite scores make argmax meaningless: such an accuracy is NaN, and a NaN is never the best.
        n_bad = int((~torch.isfinite(probs).all(-1)).sum())
        if n_bad:
            self.warn(f"the model gave non-finite scores on {n_bad}/{len(gold)} validation questions at step {step}; "
                      "its validation accuracy is not a number")
        p_gold = probs[torch.arange(len(gold)), gold].clamp_min(1e-12)
        by_topic: dict[str, list[float]] = {}
        for r, c in zip(self.val_recs, correct.tolist(), strict=True):
            by_topic.setdefault(r.topic, []).append(c)
        row = {
            "step": step,
            "split": "val",
            "accuracy": math.nan if n_bad else round(correct.mean().item(), 6),
            "loss": round(-p_gold.log().mean().item(), 6),
            "n": len(gold),
            "accuracy_by_topic": {k: round(sum(v) / len(v), 4) for k, v in sorted(by_topic.items())},
            "seconds": round(time.perf_counter() - t0, 3),
        }
        self.metrics.write(row)
        self.last_val = row
        letters = "ABCDEFGHIJ"
        # Per-question results travel with the checkpoint, so a promotion gate can run a paired test.
        self.last_val_predictions = {
            "step": step,
            "predictions": [
                {"id": r.id, "pred": letters[int(p)], "answer": r.answer, "correct": bool(c)}
                for r, p, c in zip(self.val_recs, pred.tolist(), correct.tolist(), strict=True)
            ],
        }
        return row

    # training ---------------------------------------------------------------------------------------

    def examples_of(self, rows: list[list[Any]]) -> list[list[Example]]:
        return [[(self.replay_ex if p.source == "replay" else self.train_ex)[p.index] for p in row] for row in rows]

    def train_step(self, step: int) -> dict[str, Any]:
        t = self.spec.train
        picks = self.composer.next_step(step)
        rows = self.examples_of(picks)
        world, rank = self.acc.num_processes, self.acc.process_index
        n_targets = sum(len(e) - e.label_start for row in rows for e in row)
        micro = micro_batches(rows[rank::world], self.layout, self.row_budget, self.grad_accum)
        micro, weights = even_micro_batches(micro, self.acc) if self.sharded else (micro, [1.0] * len(micro))
        self.model.train()
        loss_sum = 0.0
        pad = self.tok.pad_token_id
        for i, (mb, weight) in enumerate(zip(micro, weights, strict=True)):
            if self.layout == "grouped":
                batch = collate_grouped(mb, pad)
            elif self.layout in ("varlen", "packed"):
                batch = collate_packed(mb, pad, self.dtype, mask=self.layout == "packed")
            else:
                batch = collate_padded([e for row in mb for e in row], pad)
            batch = batch.to(self.device)
            last = i == len(micro) - 1
            ctx = (no_gradient_sync(self.fsdp_layers, skip=not last) if self.sharded
                   else self.acc.no_sync(self.model) if not last else _null())
            with ctx:
                loss = answer_loss_sum(self.model, batch) / n_targets
                if weight != 1.0:
                    loss = loss * weight
                self.acc.backward(loss * world)
            loss_sum += loss.item()
        grad_norm = total_grad_norm(self.acc.clip_grad_norm_(self.model.parameters(), t.max_grad_norm))
        loss = loss_sum * world if world == 1 else self._mean_loss(loss_sum)
        applied = self.guard.check(step + 1, loss, grad_norm)  # raises NonFiniteError to stop the run
        if applied:
            self.opt.step()
        else:
            self.warn(f"{self.guard.reason} at step {step + 1}: skipped its update "
                      f"({self.guard.skipped} step(s) skipped so far)")
        with warnings.catch_warnings():  # the schedule follows steps, applied or skipped (torch warns on a skip)
            warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
            self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        n_tokens = sum(len(e) for row in rows for e in row)
        replay_tokens = sum(len(e) for row, prow in zip(rows, picks, strict=True)
                            for e, p in zip(row, prow, strict=True) if p.source == "replay")
        diffs = [DIFFICULTY_LEVEL.get(self.train_recs[p.index].difficulty, 1)
                 for prow in picks for p in prow if p.source == "train"]
        return {
            "loss": loss,
            "grad_norm": grad_norm,
            "applied": applied,
            "tokens": n_tokens,
            "replay_tokens": replay_tokens,
            "samples": sum(len(r) for r in rows),
            "difficulty_sum": sum(diffs),
            "difficulty_n": len(diffs),
        }

    def stopping(self) -> bool:
        """Whether any rank got SIGTERM/SIGINT: every rank must stop after the same step, or the others would wait
        in the next step's collectives for it."""
        if self.acc.num_processes == 1:
            return self.stop_signal is not None
        flag = torch.tensor([0.0 if self.stop_signal is None else float(self.stop_signal)], device=self.device)
        got = int(self.acc.reduce(flag, reduction="sum").item())
        if got and self.stop_signal is None:
            self.stop_signal, self.stop_since = int(signal.SIGTERM), time.monotonic()
        return bool(got)

    def _mean_loss(self, local: float) -> float:
        t = torch.tensor([local], device=self.device)
        return float(self.acc.reduce(t, reduction="sum").item())

    def run(self) -> int:
        t = self.spec.train
        self.best_step: int | None = None
        self.best_acc: float | None = None
        self.last_val: dict[str, Any] | None = None
        self.guard = NonFiniteGuard(t)
        start = self.maybe_resume()
        first_val = None
        if start == 0:
            first_val = self.validate(0)
            if self.main:
                write_step0_predictions(self.run_dir, self.last_val_predictions)
            self.log(f"step 0 validation accuracy: {first_val['accuracy']:.1%} ({first_val['n']} questions)")
        else:
            first_val = first_val_row(self.run_dir)
        progress = ProgressView(t.steps, start, enabled=self.main)
        window: dict[str, float] = {}
        t_window = time.perf_counter()
        t_start = time.perf_counter()
        step = start
        with progress:
            while step < t.steps and not self.stopping():
                out = self.train_step(step)
                step += 1
                for k in ("tokens", "replay_tokens", "samples", "difficulty_sum", "difficulty_n"):
                    window[k] = window.get(k, 0) + out[k]
                if out["applied"]:  # a skipped step's loss is not a number to average
                    window["loss"] = window.get("loss", 0.0) + out["loss"]
                    window["n"] = window.get("n", 0) + 1
                if step % t.log_every == 0 or step == t.steps:
                    dt = time.perf_counter() - t_window
                    row = self.train_row(step, window, dt, time.perf_counter() - t_start, start)
                    row["grad_norm"] = round(out["grad_norm"], 4)
                    self.metrics.write(row)
                    loss = row["loss"] if row["loss"] is not None else math.nan
                    progress.update(step, loss=loss, tps=row["tokens_per_s"])
                    if not progress.live:
                        self.log(
                            f"step {step}/{t.steps} loss {loss:.4f} lr {row['lr']:.2e} "
                            f"{row['tokens_per_s']:.0f} tok/s eta {row['eta_s']:.0f}s"
                        )
                    window, t_window = {}, time.perf_counter()
                else:
                    progress.update(step)
                if step % t.eval_every == 0 or step == t.steps:
                    v = self.validate(step)
                    progress.update(step, acc=v["accuracy"])
                    if not progress.live:
                        self.log(f"step {step} validation accuracy {v['accuracy']:.1%} loss {v['loss']:.4f}")
                if step % t.save_every == 0 or step == t.steps:
                    self.save_checkpoint(step)
        if self.stop_signal is not None and step < t.steps:
            if not (self.ckpt_dir / f"step-{step:08d}").exists():
                self.save_checkpoint(step)
            self.log(f"stopped by signal {self.stop_signal} at step {step}; checkpoint saved, resume with the same job")
            return EXIT_CANCELLED
        final = self.last_val
        if final is None or final["step"] != step:
            final = self.validate(step)
        if first_val is not None:
            self.log(
                f"validation accuracy: step 0 {first_val['accuracy']:.1%} -> step {step} {final['accuracy']:.1%} "
                f"({final['n']} held-out questions; best checkpoint: step {self.best_step})"
            )
            gain = gain_report(self.run_dir, self.last_val_predictions)
            if gain:
                self.log(gain)
        return 0

    def train_row(self, step: int, w: dict[str, float], dt: float, elapsed: float, start: int) -> dict[str, Any]:
        t = self.spec.train
        tps = w["tokens"] / max(dt, 1e-9)
        row: dict[str, Any] = {
            "step": step,
            "split": "train",
            "loss": round(w["loss"] / w["n"], 6) if w.get("n") else None,
            "skipped_steps": self.guard.skipped,
            "lr": self.sched.get_last_lr()[0],
            "tokens_per_s": round(tps, 1),
            "samples": int(w["samples"]),
            "tokens": int(w["tokens"]),
            "replay_fraction": round(w["replay_tokens"] / max(1, w["tokens"]), 4),
            "mean_difficulty": round(w["difficulty_sum"] / w["difficulty_n"], 4) if w["difficulty_n"] else None,
            "elapsed_s": round(elapsed, 2),
            "eta_s": round(elapsed / max(1, step - start) * (t.steps - step), 1),
        }
        if self.flops_peak:
            row["mfu"] = round(tps * 4 * self.n_params / self.flops_peak, 4)
        if self.device.type == "cuda":
            row["gpu_mem_gb"] = round(torch.cuda.memory_allocated(self.device) / 2**30, 2)
            row["gpu_peak_mem_gb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2)
        return row



def run(job: Any, run_dir: Path) -> int:
    """Entry point of the `train` kind (see the module docstring)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    trainer = Trainer(job, run_dir)

    def on_signal(signum: int, frame: Any) -> None:
        if trainer.stop_signal is not None:
            if time.monotonic() - trainer.stop_since < REPEATED_SIGNAL_S:
                return  # the same request, delivered twice
            raise KeyboardInterrupt  # a second request: stop now
        trainer.stop_signal, trainer.stop_since = signum, time.monotonic()
        trainer.log(f"received {stop_reason(signum)}: finishing this step and saving a checkpoint")  # rank 0 only

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        trainer.setup()
        if trainer.stop_signal is not None:
            return EXIT_CANCELLED
        return trainer.run()
    except (DataError, CheckpointError, NonFiniteError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except RuntimeError as e:
        acc = getattr(trainer, "acc", None)
        if acc is None or acc.num_processes == 1:
            raise
        print(collective_failure(acc, e, trainer.spec.resources.collective_timeout_s), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_CANCELLED
    finally:
        if hasattr(trainer, "metrics"):
            trainer.metrics.close()
