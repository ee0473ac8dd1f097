"""The trainer's checkpoint stage: write a checkpoint (manifest, then trainer_state.json last, then rename) and
resume from the newest intact one, passing over damaged ones with a warning that names the file and why.

A mixin of the `train` recipe's Trainer: it uses the Trainer's accelerator, model, optimizer, scheduler,
sample composer, tokenizer, metrics and best-checkpoint bookkeeping."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from runner.files import fsync_dir, fsync_tree
from runner.stats import finite
from runner.workloads.scoring.prompts import PromptStyle, write_prompt_file
from runner.workloads.training.checkpoints import (
    STATE,
    complete_checkpoints,
    is_better,
    point_best,
    retain,
    rng_state,
    set_rng_state,
)
from runner.workloads.training.integrity import (
    CheckpointDamaged,
    CheckpointError,
    Loaded,
    load_checkpoint,
    set_aside,
    write_manifest,
)
from runner.workloads.training.sharding import (
    full_adapter_state,
    load_full_adapter,
    local_optimizer_state,
    reshard_optimizer_state,
)


class Checkpointing:
    """save_checkpoint, maybe_resume and apply_checkpoint for a Trainer (see the module docstring)."""

    acc: Any
    model: Any
    opt: Any
    sched: Any
    tok: Any
    composer: Any
    metrics: Any
    guard: Any
    job: Any
    spec: Any
    ckpt_dir: Path
    device: Any
    main: bool
    sharded: bool
    base_path: Any
    best_step: int | None
    best_acc: float | None
    last_val: dict[str, Any] | None
    log: Callable[[str], None]
    warn: Callable[[str], None]

    def save_checkpoint(self, step: int) -> None:
        """Write checkpoint `step`; it becomes `best` if its own validation beats every earlier checkpoint's."""
        self.acc.wait_for_everyone()
        val_acc = self.last_val["accuracy"] if self.last_val and self.last_val["step"] == step else None
        if is_better(val_acc, self.best_acc):
            self.best_acc, self.best_step = val_acc, step
        model = self.acc.unwrap_model(self.model)
        adapter_state = None
        if self.acc.num_processes > 1:  # every rank takes part in gathering the adapter; rank 0 writes it
            from peft import get_peft_model_state_dict

            full = full_adapter_state(model) if self.sharded else self.acc.get_state_dict(self.model)
            adapter_state = get_peft_model_state_dict(model, state_dict=full)
        name = f"step-{step:08d}"
        tmp = self.ckpt_dir / f".tmp-{name}"  # the same name on every rank: they all write into it
        if self.main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.acc.wait_for_everyone()
        # Every rank saves its own optimizer state (sharded under FSDP) and random streams.
        suffix = self._rank_suffix()
        torch.save(local_optimizer_state(self.opt) if self.sharded else self.opt.state_dict(),
                   tmp / f"optimizer{suffix}.pt")
        torch.save(rng_state(), tmp / f"rng{suffix}.pt")
        self.acc.wait_for_everyone()
        if not self.main:
            return
        model.save_pretrained(tmp / "adapter", state_dict=adapter_state)
        write_prompt_file(tmp / "adapter", PromptStyle.of(self.spec.prompt))  # read back by eval, serve, promote
        self.tok.save_pretrained(tmp / "tokenizer")
        torch.save(self.sched.state_dict(), tmp / "scheduler.pt")
        state = {
            "world_size": self.acc.num_processes,
            "step": step,
            "val_accuracy": val_acc,
            "best_step": self.best_step,
            "best_accuracy": self.best_acc,
            "base_model": self.spec.model.base,
            "base_model_path": self.base_path,
            "job_name": self.spec.name,
            "spec_hash": getattr(self.job, "spec_hash", None),
            "composer": self.composer.state_dict(),
            "last_val": self.last_val,
            "skipped_steps": self.guard.skipped,
            "time": time.time(),
        }
        vp = getattr(self, "last_val_predictions", None)
        if vp is not None and vp["step"] == step:
            (tmp / "val_predictions.json").write_text(json.dumps(vp) + "\n")
        write_manifest(tmp)
        (tmp / STATE).write_text(json.dumps(state, indent=1) + "\n")  # written last: marks the checkpoint complete
        fsync_tree(tmp)
        final = self.ckpt_dir / name
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        point_best(self.ckpt_dir, self.best_step)
        retain(self.ckpt_dir, self.spec.train.keep_checkpoints, self.best_step)
        fsync_dir(self.ckpt_dir)

    def _rank_suffix(self) -> str:
        return "" if self.acc.num_processes == 1 else f".rank{self.acc.process_index}"

    def maybe_resume(self) -> int:
        """Load the newest intact checkpoint of this run directory; return the step to continue from."""
        for p in self.ckpt_dir.glob(".tmp-step-*") if self.ckpt_dir.is_dir() else []:
            shutil.rmtree(p, ignore_errors=True)  # torn writes of a killed run
        suffix, world = self._rank_suffix(), self.acc.num_processes
        ck: Loaded | None = None
        damaged: list[Path] = []
        for _, path in reversed(complete_checkpoints(self.ckpt_dir)):
            why = None
            try:
                ck = load_checkpoint(path, world, suffix)
            except CheckpointDamaged as e:
                ck, why = None, str(e)
            if world > 1:  # every process must resume from the same checkpoint, whichever found the damage
                bad = self.acc.reduce(torch.tensor([float(ck is None)], device=self.device), reduction="sum")
                if bad.item():
                    ck = None
            if ck is not None:
                break
            if why or self.main:  # a process's own files (optimizer.rankN.pt) are read by that process only
                print(f"warning: checkpoint {path.name} is damaged, passing over it: "
                      f"{why or 'a file another process read is damaged'}", file=sys.stderr, flush=True)
            damaged.append(path)
        self.acc.wait_for_everyone()
        if self.main:
            for path in damaged:
                self.warn(f"set {path.name} aside as {set_aside(path).name}")
        self.acc.wait_for_everyone()
        if ck is None:
            if damaged:
                self.warn("no intact checkpoint left: starting again from step 0")
                self.metrics.truncate_after(-1)
            return 0
        self.apply_checkpoint(ck)
        if self.main and damaged:
            point_best(self.ckpt_dir, self.best_step)
        if not ck.has_manifest:
            self.log(f"note: {ck.path.name} has no manifest.json (written by an earlier version); "
                     "its files were read but not checked against recorded hashes")
        self.metrics.truncate_after(ck.step)
        self.log(f"resuming from step {ck.step} ({ck.path})")
        return ck.step

    def apply_checkpoint(self, ck: Loaded) -> None:
        from peft import set_peft_model_state_dict

        try:
            self.composer.load_state_dict(ck.state["composer"])
            if self.sharded:  # this rank's part of each full adapter tensor, and its own optimizer shard
                load_full_adapter(self.model, ck.adapter)
                self.opt.load_state_dict(ck.optimizer)
                reshard_optimizer_state(self.opt)
            else:
                set_peft_model_state_dict(self.acc.unwrap_model(self.model), ck.adapter)
                self.opt.load_state_dict(ck.optimizer)
            self.sched.load_state_dict(ck.scheduler)
            set_rng_state(ck.rng)
        except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(
                f"{ck.path}: does not fit this job's model, optimizer or data ({type(e).__name__}: {e}); "
                "start anew with `runner run --fresh`"
            ) from None
        best_acc = ck.state.get("best_accuracy")
        finite_best = finite(best_acc) is not None
        self.best_step, self.best_acc = (ck.state.get("best_step"), best_acc) if finite_best else (None, None)
        self.last_val = ck.state.get("last_val")
        self.guard.skipped = int(ck.state.get("skipped_steps") or 0)
