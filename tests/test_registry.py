"""The registry: promotion into immutable versions, the gate, aliases, integrity, names, atomicity, merge, images.

Checkpoints are real PEFT adapters on a small random Qwen2 saved as a local base directory; runs are created
through the run store, so promotion sees exactly what a training run leaves behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import MMLU, ROOT, run_cli

from runner.files import sha256_file
from runner.registry import IntegrityError, Registry, RegistryError, parse_ref, resolve_artifact
from runner.registry.store import Ref, validate_name, verify_dir
from runner.runs import RunStore
from runner.spec import job_from_data
from runner.stats import mcnemar


@pytest.fixture(scope="session")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A saved random Qwen2 base (model + tokenizer) and two different, non-trivial LoRA adapters on it."""
    import _tiny_lm
    import torch
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("adapters")
    base = _tiny_lm.model(seed=0)
    base.save_pretrained(root / "base")
    _tiny_lm.tokenizer().save_pretrained(root / "base")
    out = {"base": root / "base"}
    for key, seed in (("a1", 1), ("a2", 2)):
        m = get_peft_model(_tiny_lm.model(seed=0), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                             task_type="CAUSAL_LM"))
        torch.manual_seed(seed)
        with torch.no_grad():  # LoRA starts as a no-op (B = 0); make it change the outputs
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.3)
        m.save_pretrained(root / key)
        out[key] = root / key
    return out


def make_run(home: Path, adapters: dict[str, Path], job: str = "qa", *, acc: dict[int, float] | None = None,
             best: int | None = None, predictions: dict[int, dict[str, bool]] | None = None,
             adapter: str = "a1", data_seed: int = 0, extra_big: int = 0) -> str:
    """A finished training run with checkpoints step-10 and step-20 (adapter + optimizer state) and val metrics."""
    data = {"kind": "train", "name": job, "model": {"base": str(adapters["base"])}, "lora": {"r": 4, "alpha": 8},
            "data": {"train": "builtin:categories", "seed": data_seed}, "train": {"steps": 20}}
    store = RunStore(home)
    r = store.create(job_from_data(data, f"jobs/{job}.yaml"))
    acc = {10: 0.5, 20: 0.7} if acc is None else acc
    lines = []
    for step in (10, 20):
        ck = r.checkpoints_dir / f"step-{step:08d}"
        shutil.copytree(adapters[adapter], ck / "adapter")
        (ck / "optimizer.pt").write_bytes(b"\0" * 128)
        state = {"step": step}
        if step in acc:
            state["val_accuracy"] = acc[step]
            lines.append({"step": step, "split": "val", "accuracy": acc[step], "n": 8})
        (ck / "trainer_state.json").write_text(json.dumps(state))
        if predictions and step in predictions:
            rows = [{"id": q, "correct": c} for q, c in predictions[step].items()]
            (ck / "val_predictions.json").write_text(json.dumps({"predictions": rows}))
        if extra_big:
            (ck / "adapter" / "adapter_model.safetensors").write_bytes(os.urandom(extra_big))
    lines.insert(0, {"step": 0, "split": "val", "accuracy": 0.25, "n": 8})
    r.metrics_path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    if best is not None:
        os.symlink(f"step-{best:08d}", r.checkpoints_dir / "best")
    r.set_state("running")
    r.set_state("succeeded", exit_code=0)
    return r.ref


def manifest(home: Path, name: str, v: int) -> dict[str, Any]:
    return json.loads((home / "registry" / name / f"v{v}" / "manifest.json").read_text())


# --- promotion -----------------------------------------------------------------------------------------


def test_promote_best_writes_an_immutable_version_with_lineage(runner_home: Path, adapters: dict[str, Path]) -> None:
    ref = make_run(runner_home, adapters, acc={10: 0.5, 20: 0.75}, best=20)
    p = run_cli("promote", ref, "--checkpoint", "best", "--to", "qa-agent", "--alias", "champion")
    assert p.returncode == 0, p.stderr
    assert "qa-agent:v1" in p.stdout and "qa-agent@champion -> v1" in p.stdout
    vdir = runner_home / "registry" / "qa-agent" / "v1"
    m = manifest(runner_home, "qa-agent", 1)
    assert m["source"]["run"] == ref and m["source"]["checkpoint"] == "step-00000020"
    assert m["source"]["spec_hash"] and m["source"]["job_file"] == "jobs/qa.yaml"
    assert m["base_model"]["base"] == str(adapters["base"])
    assert m["eval"]["accuracy"] == 0.75 and m["eval"]["kind"] == "val" and m["eval"]["n"] == 8
    assert m["forced"] is False and m["created_at"]
    assert m["git"] is None or len(m["git"]["commit"]) == 40
    # The adapter and the run's spec are copied; training state (optimizer) is not.
    assert "adapter/adapter_model.safetensors" in m["files"] and "source/job.yaml" in m["files"]
    assert not any("optimizer" in f for f in m["files"])
    for rel, meta in m["files"].items():
        assert sha256_file(vdir / rel) == meta["sha256"]
        assert not os.access(vdir / rel, os.W_OK) or os.geteuid() == 0
        assert (vdir / rel).stat().st_mode & 0o222 == 0, f"{rel} is writable"

    show = run_cli("registry", "show", "qa-agent@champion")
    assert show.returncode == 0, show.stderr
    for needle in (ref, m["source"]["spec_hash"], "jobs/qa.yaml", str(adapters["base"]), "0.7500", "step-00000020"):
        assert needle in show.stdout
    ls = run_cli("registry", "ls")
    assert ls.returncode == 0 and "qa-agent" in ls.stdout and "@champion" in ls.stdout and "v1" in ls.stdout


def test_checkpoint_selectors(runner_home: Path, adapters: dict[str, Path]) -> None:
    ref = make_run(runner_home, adapters, acc={10: 0.9, 20: 0.6})  # no `best` pointer: chosen from metrics
    for sel, step in (("best", 10), ("last", 20), ("step-10", 10), ("20", 20)):
        p = run_cli("promote", ref, "--checkpoint", sel, "--to", "sel")
        assert p.returncode == 0, p.stderr
        v = len(Registry(runner_home).versions("sel"))
        assert manifest(runner_home, "sel", v)["source"]["step"] == step
    p = run_cli("promote", ref, "--checkpoint", "step-30", "--to", "sel")
    assert p.returncode == 1 and "no checkpoint at step 30" in p.stderr and "step-00000010" in p.stderr
    p = run_cli("promote", "no-such-run", "--to", "sel")
    assert p.returncode == 2 and "no run" in p.stderr


def test_missing_eval_is_an_error_naming_the_command(runner_home: Path, adapters: dict[str, Path]) -> None:
    ref = make_run(runner_home, adapters, acc={})
    p = run_cli("promote", ref, "--checkpoint", "last", "--to", "qa")
    assert p.returncode == 1
    assert "no evaluation" in p.stderr and "runner run" in p.stderr and "Traceback" not in p.stderr
    assert Registry(runner_home).versions("qa") == []
    p = run_cli("promote", ref, "--checkpoint", "last", "--to", "qa", "--force")
    assert p.returncode == 0, p.stderr
    assert manifest(runner_home, "qa", 1)["forced"] is True


# --- the gate ------------------------------------------------------------------------------------------


def test_gate_refuses_a_worse_candidate_and_force_records_it(runner_home: Path, adapters: dict[str, Path]) -> None:
    good = make_run(runner_home, adapters, "q1", acc={10: 0.5, 20: 0.8}, best=20)
    worse = make_run(runner_home, adapters, "q2", acc={10: 0.4, 20: 0.6}, best=20, adapter="a2")
    assert run_cli("promote", good, "--to", "qa-agent", "--alias", "champion").returncode == 0
    before = sorted(p.name for p in (runner_home / "registry" / "qa-agent").iterdir())
    aliases_before = (runner_home / "registry" / "qa-agent" / "aliases.json").read_text()

    p = run_cli("promote", worse, "--to", "qa-agent", "--alias", "champion")
    assert p.returncode == 1
    assert "0.6000" in p.stderr and "0.8000" in p.stderr and "refused" in p.stderr and "--force" in p.stderr
    assert "paired test not run" in p.stderr  # no per-question predictions: said so, not silently skipped
    assert sorted(x.name for x in (runner_home / "registry" / "qa-agent").iterdir()) == before
    assert (runner_home / "registry" / "qa-agent" / "aliases.json").read_text() == aliases_before

    p = run_cli("promote", worse, "--to", "qa-agent", "--alias", "champion", "--force")
    assert p.returncode == 0, p.stderr
    m = manifest(runner_home, "qa-agent", 2)
    assert m["forced"] is True and m["promotion"]["gate"]["decision"] == "forced"
    assert m["promotion"]["gate"]["holder_accuracy"] == 0.8
    assert Registry(runner_home).resolve("qa-agent@champion") == ("qa-agent", 2)
    show = run_cli("registry", "show", "qa-agent@champion")
    assert "forced" in show.stdout


def test_gate_accepts_an_equal_or_better_candidate_with_a_paired_test(runner_home: Path,
                                                                      adapters: dict[str, Path]) -> None:
    ids = [f"q{i}" for i in range(30)]
    holder = {q: i < 18 for i, q in enumerate(ids)}  # 18/30
    cand = {q: i < 6 or i >= 12 for i, q in enumerate(ids)}  # 24/30
    h_acc, c_acc = sum(holder.values()) / 30, sum(cand.values()) / 30
    a = make_run(runner_home, adapters, "q1", acc={20: h_acc}, best=20, predictions={20: holder})
    b = make_run(runner_home, adapters, "q2", acc={20: c_acc}, best=20, predictions={20: cand}, adapter="a2")
    assert run_cli("promote", a, "--to", "qa", "--alias", "champion").returncode == 0
    p = run_cli("promote", b, "--to", "qa", "--alias", "champion")
    assert p.returncode == 0, p.stderr
    b_only = sum(1 for q in ids if cand[q] and not holder[q])
    c_only = sum(1 for q in ids if holder[q] and not cand[q])
    assert f"candidate-only correct {b_only}, holder-only correct {c_only}" in p.stdout
    g = manifest(runner_home, "qa", 2)["promotion"]["gate"]
    assert g["decision"] == "accepted" and g["paired_test"]["n"] == 30
    assert g["paired_test"]["p_value"] == pytest.approx(mcnemar(b_only, c_only), abs=1e-6)
    assert Registry(runner_home).resolve("qa@champion") == ("qa", 2)


def make_eval_run(home: Path, run_ref: str, selector: str, correct: dict[str, bool], name: str = "ev",
                  target: dict[str, Any] | None = None) -> Path:
    """A finished `eval` run on `run_ref`'s checkpoint, as the evaluation workload leaves it."""
    from ruamel.yaml import YAML

    d = home / "runs" / name / f"20990101-000000-{len(list((home / 'runs').glob(name + '/*'))):04x}"
    d.mkdir(parents=True)
    YAML().dump({"kind": "eval", "name": name, "model": {"run": run_ref.split("/")[1], "checkpoint": selector}},
                (d / "job.yaml").open("w"))
    (d / "status.json").write_text(json.dumps({"kind": "eval", "state": "succeeded"}))
    preds = [{"id": q, "pred": "A" if ok else "B", "answer": "A", "probs": [0.5, 0.5]} for q, ok in correct.items()]
    out: dict[str, Any] = {"accuracy": sum(correct.values()) / len(correct), "n": len(correct), "predictions": preds}
    if target is not None:
        out["target"] = target
    (d / "eval.json").write_text(json.dumps(out))
    return d


def test_gate_uses_eval_runs_on_the_same_questions(runner_home: Path, adapters: dict[str, Path]) -> None:
    ids = [f"mmlu-{i}" for i in range(40)]
    a = make_run(runner_home, adapters, "q1", acc={20: 0.9}, best=20)
    b = make_run(runner_home, adapters, "q2", acc={20: 0.5}, best=20, data_seed=3, adapter="a2")
    make_eval_run(runner_home, a, "best", {q: i < 20 for i, q in enumerate(ids)})  # 0.5
    ck_b = runner_home / "runs" / b / "checkpoints" / "step-00000020"
    make_eval_run(runner_home, b, "step-20", {q: i >= 10 for i, q in enumerate(ids)},  # 0.75
                  target={"type": "run", "run": b, "checkpoint_path": str(ck_b)})
    make_eval_run(runner_home, b, "step-10", {q: False for q in ids})  # another checkpoint: ignored
    make_eval_run(runner_home, b, "best", {q: True for q in ids},  # an ensemble containing it: not its accuracy
                  target={"type": "ensemble", "members": [{"type": "run", "checkpoint_path": str(ck_b)}]})
    assert run_cli("promote", a, "--to", "qa", "--alias", "champion").returncode == 0
    m1 = manifest(runner_home, "qa", 1)
    assert m1["eval"]["kind"] == "eval-run" and m1["eval"]["accuracy"] == 0.5
    assert {e["kind"] for e in m1["evals"]} == {"val", "eval-run"}
    assert any(f.startswith("eval/") for f in m1["files"])
    # Validation sets differ, but both checkpoints were evaluated on the same 40 questions: that decides.
    p = run_cli("promote", b, "--checkpoint", "best", "--to", "qa", "--alias", "champion")
    assert p.returncode == 0, p.stderr
    assert "0.7500" in p.stdout and "0.5000" in p.stdout and "McNemar on 40 paired questions" in p.stdout
    g = manifest(runner_home, "qa", 2)["promotion"]["gate"]
    assert g["eval_kind"] == "eval-run" and g["paired_test"]["candidate_only_correct"] == 20
    assert g["paired_test"]["holder_only_correct"] == 10


def test_gate_needs_the_same_eval_set(runner_home: Path, adapters: dict[str, Path]) -> None:
    a = make_run(runner_home, adapters, "q1", acc={20: 0.5}, best=20)
    b = make_run(runner_home, adapters, "q2", acc={20: 0.9}, best=20, data_seed=7)  # different validation split
    assert run_cli("promote", a, "--to", "qa", "--alias", "champion").returncode == 0
    p = run_cli("promote", b, "--to", "qa", "--alias", "champion")
    assert p.returncode == 1 and "same questions" in p.stderr and "runner run" in p.stderr
    assert Registry(runner_home).versions("qa") == [1]


def test_mcnemar_on_known_tables() -> None:
    assert mcnemar(0, 0) == 1.0
    # Exact binomial: b=1, c=9 -> 2 * P(X <= 1 | n=10, p=1/2) = 2 * 11/1024
    assert mcnemar(1, 9) == pytest.approx(22 / 1024)
    # Chi-square with continuity correction: b=10, c=30 -> (|10-30|-1)^2/40 = 9.025 -> p = 0.002663
    assert mcnemar(10, 30) == pytest.approx(0.0026636, abs=1e-6)


def _mcnemar_as_the_registry_had_it(b: int, c: int) -> float:
    """The registry's own McNemar before the gate used runner.stats, kept to compare against."""
    import math

    n = b + c
    if n == 0:
        return 1.0
    if n < 25:
        tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
        return min(1.0, 2 * tail)
    return math.erfc(math.sqrt((abs(b - c) - 1) ** 2 / n / 2))


@pytest.mark.parametrize("b, c", [(0, 0), (0, 1), (1, 9), (5, 5), (3, 12), (12, 12), (0, 24), (10, 30), (20, 10),
                                  (13, 14), (40, 60), (200, 260)])
def test_the_gate_p_values_match_the_registry_s_former_mcnemar(b: int, c: int) -> None:
    from runner.registry.gate import paired_test

    cand = {f"q{i}": i < b for i in range(b + c)} | {"both": True}
    holder = {f"q{i}": i >= b for i in range(b + c)} | {"both": True}
    t = paired_test(cand, holder)
    assert t is not None and (t["candidate_only_correct"], t["holder_only_correct"]) == (b, c)
    assert t["p_value"] == pytest.approx(_mcnemar_as_the_registry_had_it(b, c), abs=1e-6)


def test_the_gate_p_value_for_a_tie_above_25_discordant_pairs_is_one() -> None:
    """Where the two differ: b == c with 26 or more discordant pairs. The former copy subtracted the continuity
    correction below zero ((0 - 1)^2 / n) and reported p < 1 for a dead heat; runner.stats clamps it at 0."""
    assert mcnemar(13, 13) == 1.0
    assert _mcnemar_as_the_registry_had_it(13, 13) == pytest.approx(0.8445, abs=1e-4)


# --- aliases, refs, names ------------------------------------------------------------------------------


def test_aliases_move_and_versions_stay(runner_home: Path, adapters: dict[str, Path]) -> None:
    a = make_run(runner_home, adapters, "q1", acc={20: 0.6}, best=20)
    b = make_run(runner_home, adapters, "q2", acc={20: 0.7}, best=20, adapter="a2")
    assert run_cli("promote", a, "--to", "qa", "--alias", "champion").returncode == 0
    assert run_cli("promote", a, "--to", "qa", "--alias", "challenger").returncode == 0
    p = run_cli("promote", b, "--to", "qa", "--alias", "champion")
    assert p.returncode == 0 and "qa@champion -> v3 (was v1)" in p.stdout
    reg = Registry(runner_home)
    assert reg.resolve("qa@champion") == ("qa", 3)
    assert reg.resolve("qa@challenger") == ("qa", 2)
    assert reg.resolve("qa:v1") == ("qa", 1) and reg.resolve("qa") == ("qa", 3)
    events = [json.loads(x) for x in (runner_home / "registry" / "qa" / "events.jsonl").read_text().splitlines()]
    moves = [(e["alias"], e["version"], e["previous"]) for e in events if e["event"] == "alias"]
    assert moves == [("champion", 1, None), ("challenger", 2, None), ("champion", 3, 1)]
    assert manifest(runner_home, "qa", 1)["source"]["run"] == a  # the old version is untouched
    p = run_cli("registry", "show", "qa@nobody")
    assert p.returncode == 2 and "no alias @nobody" in p.stderr


@pytest.mark.parametrize("bad", ["../etc", "a/b", "QA", "qa;rm -rf /", "-qa", ".qa", "a..b", "", "q a", "$(id)",
                                 "qa`x`", "x" * 64, "qa-", "q\nx"])
def test_invalid_names_are_refused(runner_home: Path, bad: str) -> None:
    with pytest.raises(RegistryError):
        validate_name(bad)
    p = run_cli("promote", "whatever", "--to", bad)
    assert p.returncode == 2 and "invalid registry name" in p.stderr
    assert not (runner_home / "registry").exists() or not any((runner_home / "registry").iterdir())


def test_refs_and_aliases_are_validated() -> None:
    assert parse_ref("qa-agent@champion") == Ref("qa-agent", alias="champion")
    assert parse_ref("qa-agent:v3") == Ref("qa-agent", version=3)
    assert parse_ref("registry:qa.agent_2:4") == Ref("qa.agent_2", version=4)
    for bad in ("qa@../x", "qa:latest", "qa@v2", "qa:v0", "qa@"):
        with pytest.raises(RegistryError):
            parse_ref(bad)


# --- integrity -----------------------------------------------------------------------------------------


def test_verify_detects_a_flipped_byte_and_loading_refuses(runner_home: Path, adapters: dict[str, Path]) -> None:
    ref = make_run(runner_home, adapters, acc={20: 0.7}, best=20)
    assert run_cli("promote", ref, "--to", "qa", "--alias", "champion").returncode == 0
    p = run_cli("registry", "verify", "qa@champion")
    assert p.returncode == 0 and "ok" in p.stdout
    assert resolve_artifact("qa@champion") == runner_home / "registry" / "qa" / "v1"

    f = runner_home / "registry" / "qa" / "v1" / "adapter" / "adapter_model.safetensors"
    f.chmod(0o644)
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    p = run_cli("registry", "verify", "qa@champion")
    assert p.returncode == 1 and "adapter/adapter_model.safetensors" in p.stderr and "sha256" in p.stderr
    with pytest.raises(IntegrityError, match="adapter/adapter_model.safetensors"):
        resolve_artifact("qa:v1")
    # A workload loading it refuses with the same message, no traceback.
    q = subprocess.run([sys.executable, "-m", "runner.workloads.recipes.artifact", "answer", "qa@champion", "--question",
                        json.dumps({"question": "2+2?", "choices": ["3", "4"]})], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert q.returncode == 1 and "refusing to load" in q.stderr and "Traceback" not in q.stderr

    # An extra file and a missing file are problems too.
    (runner_home / "registry" / "qa" / "v1" / "adapter" / "extra.bin").write_bytes(b"x")
    (runner_home / "registry" / "qa" / "v1" / "source" / "job.yaml").unlink()
    p = run_cli("registry", "verify", "qa:v1")
    assert p.returncode == 1 and "extra.bin: not in the manifest" in p.stderr and "source/job.yaml: missing" in p.stderr


def test_image_without_an_engine_is_an_environment_error(runner_home: Path, adapters: dict[str, Path]) -> None:
    ref = make_run(runner_home, adapters, acc={20: 0.7}, best=20)
    p = run_cli("promote", ref, "--to", "qa", "--image", env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert p.returncode == 2 and "--merge" in p.stderr  # a local-directory base cannot go into an image alone
    p = run_cli("promote", ref, "--to", "qa", "--image", "--merge",
                env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert p.returncode == 3 and "no Docker engine" in p.stderr and "Traceback" not in p.stderr
    assert Registry(runner_home).versions("qa") == []


def test_registry_imports_no_torch() -> None:
    code = ("import sys, runner.registry, runner.cli; from runner.registry import resolve_artifact; "
            "sys.exit(1 if 'torch' in sys.modules or 'transformers' in sys.modules else 0)")
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_the_registry_package_root_is_only_the_store() -> None:
    """What the in-container code imports: no Docker SDK, and not the gate, promotion or serving images."""
    code = ("import sys, runner.registry; "
            "heavy = [m for m in ('torch', 'transformers', 'docker', 'runner.registry.gate', "
            "'runner.registry.promote', 'runner.serving_image', 'runner.registry_cli') if m in sys.modules]; "
            "print(heavy); sys.exit(1 if heavy else 0)")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


# --- atomicity and concurrency -------------------------------------------------------------------------


def test_kill_during_promotion_leaves_the_registry_unchanged(runner_home: Path, adapters: dict[str, Path]) -> None:
    small = make_run(runner_home, adapters, "q1", acc={20: 0.6}, best=20)
    assert run_cli("promote", small, "--to", "qa", "--alias", "champion").returncode == 0
    big = make_run(runner_home, adapters, "q2", acc={20: 0.9}, best=20, extra_big=96 << 20)
    ndir = runner_home / "registry" / "qa"
    snapshot = {p.name for p in ndir.iterdir()}
    aliases = (ndir / "aliases.json").read_text()

    caught = False
    for _attempt in range(5):
        proc = subprocess.Popen([sys.executable, "-m", "runner", "promote", big, "--to", "qa", "--alias", "champion"],
                                cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None and not list(ndir.glob(".tmp-v*")):
            time.sleep(0.001)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGSTOP)  # frozen mid-promotion: readers must still see the old registry
            in_flight = bool(list(ndir.glob(".tmp-v*"))) and not (ndir / "v2").exists()
            if in_flight:
                assert run_cli("registry", "ls", "qa").returncode == 0
                assert Registry(runner_home).versions("qa") == [1]
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            if in_flight:
                caught = True
                break
        else:
            proc.wait()
        # It finished before we caught it: undo and retry.
        if (ndir / "v2").exists():
            shutil.rmtree(ndir / "v2")
            (ndir / "aliases.json").write_text(aliases)
    assert caught, "could not interrupt a promotion mid-way"

    assert Registry(runner_home).versions("qa") == [1]
    assert (ndir / "aliases.json").read_text() == aliases
    assert run_cli("registry", "verify", "qa@champion").returncode == 0
    ls = run_cli("registry", "ls")
    assert ls.returncode == 0 and "v2" not in ls.stdout
    # The next promotion takes the lock the dead one held, clears its leftovers and gets v2.
    p = run_cli("promote", big, "--to", "qa", "--alias", "champion")
    assert p.returncode == 0, p.stderr
    assert Registry(runner_home).versions("qa") == [1, 2] and not list(ndir.glob(".tmp-v*"))
    assert {p.name for p in ndir.iterdir()} == snapshot | {"v2", "events.jsonl"}


def test_concurrent_promotions_get_distinct_versions(runner_home: Path, adapters: dict[str, Path]) -> None:
    ref = make_run(runner_home, adapters, acc={20: 0.7}, best=20)
    procs = [subprocess.Popen([sys.executable, "-m", "runner", "promote", ref, "--to", "qa"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert Registry(runner_home).versions("qa") == [1, 2, 3]
    for v in (1, 2, 3):
        assert verify_dir(runner_home / "registry" / "qa" / f"v{v}") == []


# --- merge ---------------------------------------------------------------------------------------------


def test_merged_weights_give_the_same_letter_probabilities(runner_home: Path, adapters: dict[str, Path]) -> None:
    import _tiny_lm
    import torch

    from runner.workloads.recipes.artifact import load_artifact
    from runner.workloads.scoring.scorer import score_mcq

    torch.set_num_threads(1)
    ref = make_run(runner_home, adapters, acc={20: 0.7}, best=20)
    p = run_cli("promote", ref, "--to", "qa", "--merge")
    assert p.returncode == 0, p.stderr
    m = manifest(runner_home, "qa", 1)
    assert m["merged"] == "merged" and any(f.startswith("merged/") and f.endswith(".safetensors") for f in m["files"])
    merged, tok, _ = load_artifact("qa:v1", merged=True)
    with_adapter, tok2, _ = load_artifact("qa:v1", merged=False)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    items = _tiny_lm.make_items(6, [2, 4, 5], seed=3)
    pm = score_mcq(merged, tok, items)
    pa = score_mcq(with_adapter, tok2, items)
    assert torch.allclose(pm, pa, atol=1e-5), (pm - pa).abs().max()
    # ... and the adapter really matters: the base alone answers differently.
    base = _tiny_lm.model(seed=0)
    assert (score_mcq(base, tok, items) - pa).abs().max() > 1e-3


def test_a_tiny_base_is_bundled_so_the_version_stands_alone(runner_home: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    from runner.spec.models import ModelSpec
    from runner.workloads.model.loading import load_model_and_tokenizer
    from runner.workloads.recipes.artifact import load_artifact
    from runner.workloads.scoring.scorer import score_mcq

    torch.set_num_threads(1)
    spec = {"base": "tiny", "tiny": {"hidden_size": 32, "layers": 1, "heads": 2, "pretrain_steps": 0, "seed": 5}}
    base, tok = load_model_and_tokenizer(ModelSpec.model_validate(spec))
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    store = RunStore(runner_home)
    r = store.create(job_from_data({"kind": "train", "name": "tq", "model": spec,
                                    "data": {"train": "builtin:categories"}}, "jobs/tq.yaml"))
    ck = r.checkpoints_dir / "step-00000005"
    peft_model.save_pretrained(ck / "adapter")
    (ck / "trainer_state.json").write_text(json.dumps({"step": 5}))  # the trainer's last file
    r.metrics_path.write_text(json.dumps({"step": 5, "split": "val", "accuracy": 0.4}) + "\n")
    p = run_cli("promote", r.ref, "--to", "tq", "--checkpoint", "last")
    assert p.returncode == 0, p.stderr
    m = manifest(runner_home, "tq", 1)
    assert m["base_model"] == {"base": "tiny", "revision": None, "bundled": "base"}
    assert any(f.startswith("base/") and f.endswith(".safetensors") for f in m["files"])
    # Loads without the cache: the bundled base + adapter reproduce the run's model.
    monkeypatch.setenv("RUNNER_CACHE", str(tmp_path / "empty-cache"))
    model, tok2, _ = load_artifact("tq:v1")
    assert not (tmp_path / "empty-cache").exists()
    items = [type("Q", (), {"question": "Which is a colour?", "choices": ["red", "seven", "Paris"]})()]
    assert torch.allclose(score_mcq(model, tok2, items), score_mcq(peft_model, tok, items), atol=1e-5)


QUICK_JOB = """\
kind: train
name: {name}
model:
  base: tiny
lora: {{r: 16, alpha: 32}}
data:
  train: "builtin:categories?per_topic=60&topics=tools,clothing,nature,body"
  val_fraction: 0.2
  val_limit: 48
train: {{steps: {steps}, batch_size: 16, lr: 0.003, warmup_steps: 2, eval_every: 10, save_every: 10,
        log_every: 10, threads: 1}}
"""


@pytest.mark.slow
def test_quickstart_sized_runs_promote_refuse_and_force(runner_home: Path, tmp_path: Path) -> None:
    """Two real training runs on the tiny base: the better checkpoint becomes @champion, a worse one is refused
    (both numbers printed), --force accepts it, and `registry show` leads back to the run and its spec."""
    cks = []
    for name, steps in (("qs-long", 20), ("qs-short", 2)):
        job = tmp_path / f"{name}.yaml"
        job.write_text(QUICK_JOB.format(name=name, steps=steps))
        p = run_cli("run", str(job), timeout=900)
        assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
        run = RunStore(runner_home).get(name)
        for ck in run.checkpoints():
            acc = json.loads((ck / "trainer_state.json").read_text())["val_accuracy"]
            cks.append((acc, run.ref, ck.name))
    # Same data settings, so the same validation questions: the gate compares the checkpoints directly.
    hi, lo = max(cks), min(cks)
    assert hi[0] > lo[0], f"every checkpoint scored the same ({cks}); nothing to gate"
    p = run_cli("promote", hi[1], "--checkpoint", hi[2], "--to", "qa-agent", "--alias", "champion")
    assert p.returncode == 0, p.stderr
    m = manifest(runner_home, "qa-agent", 1)
    assert m["eval"]["accuracy"] == hi[0] and m["base_model"]["bundled"] == "base"
    assert any(f.startswith("tokenizer/") for f in m["files"])
    p = run_cli("promote", lo[1], "--checkpoint", lo[2], "--to", "qa-agent", "--alias", "champion")
    assert p.returncode == 1 and f"{lo[0]:.4f}" in p.stderr and f"{hi[0]:.4f}" in p.stderr and "refused" in p.stderr
    assert Registry(runner_home).versions("qa-agent") == [1]
    p = run_cli("promote", lo[1], "--checkpoint", lo[2], "--to", "qa-agent", "--alias", "champion", "--force")
    assert p.returncode == 0, p.stderr
    show = run_cli("registry", "show", "qa-agent@champion")
    assert lo[1] in show.stdout and "forced" in show.stdout and "base model  tiny" in show.stdout
    assert manifest(runner_home, "qa-agent", 2)["source"]["spec_hash"] in show.stdout
    assert run_cli("registry", "verify", "qa-agent:v1").returncode == 0
    # The promoted version loads without the run or the cache and scores like the run's checkpoint did.
    q = subprocess.run([sys.executable, "-m", "runner.workloads.recipes.artifact", "answer", "qa-agent:v1", "--question",
                        json.dumps({"question": "Which of these is a tool?", "choices": ["hammer", "shirt", "tree",
                                                                                         "elbow"]})],
                       capture_output=True, text=True, cwd=ROOT, timeout=300,
                       env={**os.environ, "RUNNER_CACHE": str(tmp_path / "no-cache")})
    assert q.returncode == 0, q.stderr[-2000:]
    assert json.loads(q.stdout.strip().splitlines()[-1])["answer"] in "ABCD"


# --- serving image files -------------------------------------------------------------------------------


def test_the_baked_serve_job_is_a_valid_serve_job(tmp_path: Path) -> None:
    from runner.serving_image import (
        SERVING_JOB,
        SERVING_PORT,
        SERVING_ROOT,
        render_serving_files,
        serve_job_data,
        serve_job_yaml,
    )
    from runner.spec import load_job
    from runner.spec.serve import ServeJob

    job = serve_job_data("qa-agent", 3)
    assert isinstance(job, ServeJob)
    assert job.kind == "serve" and job.name == "qa-agent-v3" and job.registry == SERVING_ROOT and job.model is None
    assert (job.server.host, job.server.port) == ("0.0.0.0", SERVING_PORT)
    text = serve_job_yaml(job)
    # The file as images have always carried it: only what is set, kind and name first.
    assert text == ("kind: serve\nname: qa-agent-v3\nregistry: /srv/qa-runner/artifact\n"
                    "server:\n  host: 0.0.0.0\n  port: 8000\n")
    (tmp_path / "serve.yaml").write_text(text)
    assert load_job(tmp_path / "serve.yaml").spec == job
    manifest = {"source": {"run": "qa/20990101-000000-0001", "spec_hash": "abc"}, "base_model": {"base": "tiny"},
                "merged": None}
    files = render_serving_files("qa-runner-cpu:x", "qa-agent", 3, manifest)
    assert files["serve.yaml"] == text and f"COPY serve.yaml {SERVING_JOB}" in files["Dockerfile"]
    # A name near the 63-character limit leaves no room for `-vN`: no serve job is baked in.
    assert serve_job_data("a" * 61, 3) is None
    files = render_serving_files("qa-runner-cpu:x", "a" * 61, 3, manifest)
    assert "serve.yaml" not in files and "HEALTHCHECK" not in files["Dockerfile"]


def test_promote_image_takes_the_engine_and_settings_from_a_serve_job(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.serving_image import SERVING_ROOT, ServeTemplate, render_serving_files, serving_base
    from runner.spec import load_job

    monkeypatch.setenv("QA_TOKEN", "s3cret-token")
    f = tmp_path / "serve-vllm.yaml"
    f.write_text("kind: serve\nname: serve-vllm\nregistry: qa-agent@champion\nmodel: {base: smollm2-135m}\n"
                 "engine: vllm\nvllm: {dtype: float32, max_model_len: 1024}\n"
                 "server: {host: 127.0.0.1, port: 0, token: '${env:QA_TOKEN}', max_batch: 8}\n"
                 "answer: {deadline_s: 4}\ntags: {team: a}\n")
    template = ServeTemplate(load_job(f))
    manifest = {"source": {"run": "qa/20990101-000000-0001", "spec_hash": "abc"}, "base_model": {"base": "tiny"},
                "merged": None, "image_flavour": "cpu"}
    assert serving_base(manifest, template) == "cpu-vllm"
    assert serving_base({**manifest, "image_flavour": "rocm"}, template) == "rocm-vllm"
    assert serving_base(manifest, None) == "cpu"
    files = render_serving_files("qa-runner-cpu-vllm:x", "qa-agent", 3, manifest, template)
    text = files["serve.yaml"]
    # The version is what is served; the job's engine, flags, agents and server limits come along; the token
    # stays a template (the image holds no secret), and the job's model, address and tags do not.
    assert "s3cret-token" not in text and "${env:QA_TOKEN}" in text, text
    assert "smollm2" not in text and "champion" not in text and "tags" not in text, text
    assert "FROM qa-runner-cpu-vllm:x" in files["Dockerfile"] and "qa-runner.engine=vllm" in files["Dockerfile"]
    baked = tmp_path / "baked.yaml"
    baked.write_text(text)
    job = load_job(baked).spec
    assert (job.engine, job.vllm.dtype, job.vllm.max_model_len, job.answer.deadline_s) == ("vllm", "float32", 1024, 4)
    assert (job.registry, job.model, job.server.host, job.server.port) == (SERVING_ROOT, None, "0.0.0.0", 8000)
    assert (job.server.max_batch, job.server.token) == (8, "s3cret-token")  # filled from the container's env


@pytest.mark.parametrize(("body", "needle"), [
    ("engine: llamacpp\nllamacpp: {gguf: q8_0}\n", "engine llamacpp runs on the local backend only"),
    ("server: {token: plain-text}\n", "server.token is written in the file"),
    ("ensemble: [{model: {base: tiny}}]\n", "ensemble names models that are not in this version"),
    ("engine: vllm\nvllm: {python: /usr/bin/python3}\n", "vllm.python names a Python on this machine"),
])
def test_promote_image_refuses_a_serve_job_an_image_could_not_serve(tmp_path: Path, body: str, needle: str) -> None:
    from runner.serving_image import ServeTemplate
    from runner.spec import load_job

    f = tmp_path / "serve.yaml"
    f.write_text("kind: serve\nname: serve-x\nregistry: qa-agent@champion\n" + body)
    with pytest.raises(RegistryError, match=needle):
        ServeTemplate(load_job(f))


def test_promote_serve_is_checked_before_anything_is_read(tmp_path: Path, runner_home: Path) -> None:
    (tmp_path / "train.yaml").write_text("kind: train\nname: t\nmodel: {base: tiny}\n"
                                        "data: {train: [{path: x.jsonl, remote: true}]}\n")
    (tmp_path / "serve.yaml").write_text("kind: serve\nname: s\nregistry: qa@champion\nengine: vllm\n")
    p = run_cli("promote", "no-such-run", "--to", "qa", "--serve", str(tmp_path / "serve.yaml"))
    assert p.returncode == 2 and "add --image to build one" in p.stderr and "Traceback" not in p.stderr, p.stderr
    p = run_cli("promote", "no-such-run", "--to", "qa", "--image", "--serve", str(tmp_path / "train.yaml"))
    assert p.returncode == 2 and "a `serve` job file is needed" in p.stderr, p.stderr
    p = run_cli("promote", "no-such-run", "--to", "qa", "--image", "--serve", str(tmp_path / "nowhere.yaml"))
    assert p.returncode != 0 and "nowhere.yaml" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (runner_home / "registry" / "qa").exists()


def test_a_serving_image_refuses_an_offline_base_left_out_of_the_version(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from runner.serving_image import build_serving_image

    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent/docker.sock")
    for base in ("tiny", "smollm2-135m"):
        manifest = {"source": {"run": "qa/20990101-000000-0001", "spec_hash": "abc"}, "merged": None,
                    "base_model": {"base": base, "bundled": None}}
        with pytest.raises(RegistryError, match=f"without its {base} base bundled.*promote the run again") as e:
            build_serving_image(tmp_path, manifest, "qa", 1)
        assert e.value.code == 1  # refused, as a gate refusal is
        manifest["base_model"]["bundled"] = "base"  # with the base in the version, only the engine is missing
        with pytest.raises(RegistryError, match="no Docker engine answers"):
            build_serving_image(tmp_path, manifest, "qa", 1)


# --- serving image on the real engine ------------------------------------------------------------------


def _engine() -> str | None:
    try:
        import docker

        docker.from_env(timeout=5).ping()
        return None
    except Exception as e:
        return f"no Docker engine answers ({e.__class__.__name__}); .ci/run starts one"


@pytest.mark.docker
@pytest.mark.slow
def test_serving_image_answers_an_mmlu_question(runner_home: Path, adapters: dict[str, Path]) -> None:
    why = _engine()
    if why:
        pytest.skip(why)
    import docker
    import docker.errors

    ref = make_run(runner_home, adapters, acc={20: 0.7}, best=20)
    name = f"qa-test-{os.getpid()}"
    client = docker.from_env(timeout=600)
    try:
        p = run_cli("promote", ref, "--to", name, "--alias", "champion", "--merge", "--image", timeout=1500)
        assert p.returncode == 0, p.stderr[-3000:]
        m = manifest(runner_home, name, 1)
        img = m["image"]
        assert img["tag"] == f"{name}:v1" and img["id"].startswith("sha256:")
        assert client.images.get(f"{name}:v1").id == img["id"] == client.images.get(f"{name}:champion").id
        csv = sorted((MMLU / "val").glob("*.csv"))[0]
        out = client.containers.run(
            f"{name}:champion", ["answer", "--mmlu", f"/data/{csv.name}", "--index", "0"], remove=True,
            network_disabled=True, volumes={str(csv.parent): {"bind": "/data", "mode": "ro"}}, stderr=True,
        ).decode()
        ans = json.loads(out.strip().splitlines()[-1])
        assert ans["answer"] in "ABCD" and ans["model"] == f"{name}:v1" and ans["gold"] in "ABCD"
        assert abs(sum(ans["probs"].values()) - 1.0) < 1e-3
        # The artifact inside the image verifies against its manifest.
        ok = client.containers.run(f"{name}:v1", ["verify"], remove=True, network_disabled=True).decode()
        assert "ok:" in ok
        # The default entrypoint starts the agents' HTTP service on the artifact.
        # The cpu flavour ships the service's stack: an image without it is a regression, not an expected failure.
        client.containers.run(f"{name}:v1", ["python3", "-c", "import fastapi, uvicorn"], remove=True,
                              network_disabled=True)
        c = client.containers.run(f"{name}:v1", detach=True, network_disabled=True)
        try:
            probe = ("import json, time, urllib.request as u\n"
                     "for _ in range(120):\n"
                     "    try: u.urlopen('http://127.0.0.1:8000/healthz', timeout=2); break\n"
                     "    except Exception: time.sleep(0.5)\n"
                     "r = u.Request('http://127.0.0.1:8000/v1/answer', data=json.dumps({'question': 'What is 2+2?', "
                     "'choices': ['3', '4', '5', '6']}).encode(), headers={'Content-Type': 'application/json'})\n"
                     "print(u.urlopen(r, timeout=30).read().decode())\n")
            rc, out = c.exec_run(["python3", "-c", probe])
            assert rc == 0, out.decode()[-2000:] + c.logs().decode()[-2000:]
            assert json.loads(out.decode().strip().splitlines()[-1])["answer"] in "ABCD"
            # The image's HEALTHCHECK passes against the running service (run here rather than waited for).
            test = client.images.get(f"{name}:v1").attrs["Config"]["Healthcheck"]["Test"]
            assert test[0] == "CMD-SHELL" and "/healthz" in test[1]
            rc, out = c.exec_run(["sh", "-c", test[1]])
            assert rc == 0, out.decode()
        finally:
            c.remove(force=True)
    finally:
        for tag in (f"{name}:champion", f"{name}:v1"):
            try:
                client.images.remove(tag, force=True)
            except Exception:
                pass
