"""Agreement with lm-evaluation-harness: the project's MCQ scorer (`prompt.style: mmlu`) against lm-eval 0.4.x's own
zero-shot MMLU task, on the same MMLU questions and the same model, in one process.

The lm-eval side is lm-eval itself: a local task per subject, generated into a temporary directory, that includes
the installed package's `mmlu_SUBJECT.yaml` (so its description line, `doc_to_text`, choices " A".." D" and metric
are lm-eval's own) and changes only where the data comes from: a JSONL written from the MMLU CSV rows as they are.
lm-eval's `hf` model scores the four continuations; its prediction is the argmax of the logged log-likelihoods.
The project's side reads the same CSV files through its own importer and scores them with `score_mcq`, loaded and
prepared as the eval kind does on a CPU. Prints `key: value` lines; the headline is `lm_eval_agreement`.
The prompt texts are compared too: the importer turns CR LF into LF and strips the spaces some MMLU choices end
with, so those prompts differ from lm-eval's in whitespace only (`prompt_mismatches_beyond_whitespace` counts
any other difference).

    python bench/lm_eval_agreement.py [--data /work/shared/data/mmlu/val] [--subjects a,b] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_DATA = Path("/work/shared/data/mmlu/val")
TASK_PREFIX = "qa_mmlu_val_"
LETTERS4 = "ABCD"


class AgreementError(Exception):
    """A setup problem worth one line: what is wrong and how to fix it."""


@dataclass
class SideResult:
    """One scorer's predictions (choice indices) per (subject, row), and how long it took."""

    preds: dict[tuple[str, int], int] = field(default_factory=dict)
    gold: dict[tuple[str, int], int] = field(default_factory=dict)
    prompts: dict[tuple[str, int], str] = field(default_factory=dict)
    continuations: set[tuple[str, ...]] = field(default_factory=set)  # the texts scored after each prompt
    seconds: float = 0.0
    reported_acc: float | None = None  # lm-eval's own per-sample `acc`, averaged


# --- the data -------------------------------------------------------------------------------------------------


def subject_files(data_dir: Path, subjects: list[str] | None = None) -> dict[str, Path]:
    """subject -> its `SUBJECT_val.csv` (all of them when `subjects` is None)."""
    if not data_dir.is_dir():
        raise AgreementError(
            f"--data {data_dir}: no such directory; point it at MMLU's val/ folder of CSV files"
        )
    found = {p.name.removesuffix("_val.csv"): p for p in sorted(data_dir.glob("*_val.csv"))}
    if not found:
        raise AgreementError(f"--data {data_dir}: no *_val.csv files; point it at MMLU's val/ folder")
    if subjects is None:
        return found
    missing = [s for s in subjects if s not in found]
    if missing:
        raise AgreementError(f"--subjects: no {', '.join(f'{s}_val.csv' for s in missing)} in {data_dir}")
    return {s: found[s] for s in subjects}


def csv_docs(path: Path) -> list[dict[str, Any]]:
    """The rows of one MMLU CSV as lm-eval's MMLU docs (question, choices, answer index), the text untouched."""
    docs = []
    with path.open(newline="", encoding="utf-8-sig") as f:
        for lineno, row in enumerate(csv.reader(f), 1):
            if not any(c.strip() for c in row):
                continue
            if len(row) != 6 or row[5].strip() not in LETTERS4:
                raise AgreementError(f"{path}:{lineno}: expected question,A,B,C,D,answer with answer A-D")
            docs.append({"question": row[0], "choices": row[1:5], "answer": LETTERS4.index(row[5].strip())})
    return docs


def installed_mmlu_task(subject: str) -> Path:
    """The installed lm-eval's zero-shot MMLU task file of `subject`."""
    import lm_eval

    path = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default" / f"mmlu_{subject}.yaml"
    if not path.is_file():
        raise AgreementError(
            f"lm-eval {lm_eval.__version__} has no MMLU task for {subject!r} (looked at {path})"
        )
    return path


def write_lm_eval_tasks(files: dict[str, Path], out_dir: Path) -> list[str]:
    """One lm-eval task per subject under `out_dir`: lm-eval's MMLU task of that subject reading a local JSONL."""
    names = []
    for subject, csv_path in files.items():
        data = out_dir / f"{subject}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in csv_docs(csv_path)), encoding="utf-8")
        name = TASK_PREFIX + subject
        task = {
            "include": str(installed_mmlu_task(subject)),
            "task": name,
            "tag": TASK_PREFIX.rstrip("_"),
            "dataset_path": "json",
            "dataset_name": None,
            # its own datasets cache, so nothing is left in ~/.cache and no stale copy is ever read
            "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(out_dir / "datasets")},
            "test_split": "test",
            "fewshot_split": None,
        }
        (out_dir / f"{name}.yaml").write_text(json.dumps(task, indent=2) + "\n")  # JSON is YAML
        names.append(name)
    return names


# --- the two scorers ------------------------------------------------------------------------------------------


def _offline() -> None:
    """Nothing may come from a hub: the model is a local directory and the data local JSONL files."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"
    for module, attr in (
        ("huggingface_hub.constants", "HF_HUB_OFFLINE"),
        ("datasets.config", "HF_DATASETS_OFFLINE"),
    ):
        if module in sys.modules:  # already imported: its flag was read at import time
            setattr(sys.modules[module], attr, True)


def _sample_requests(sample: dict[str, Any]) -> list[tuple[str, str]]:
    """(context, continuation) of each of a logged sample's requests, in choice order."""
    args = sample["arguments"]
    reqs = args if isinstance(args, (list, tuple)) else list(args.values())
    return [tuple(r) if isinstance(r, (list, tuple)) else tuple(r.values()) for r in reqs]  # type: ignore[misc]


def run_lm_eval(model_dir: Path, files: dict[str, Path], batch_size: int = 16) -> SideResult:
    """lm-eval's `hf` model on the generated tasks; predictions from the logged log-likelihoods."""
    _offline()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = SideResult()
    with tempfile.TemporaryDirectory(prefix="lm-eval-mmlu-") as tmp:
        names = write_lm_eval_tasks(files, Path(tmp))
        manager = TaskManager(include_path=tmp, include_defaults=False)
        t0 = time.perf_counter()
        results = simple_evaluate(
            model="hf",
            model_args={"pretrained": str(model_dir), "dtype": "float32"},
            tasks=names,
            num_fewshot=0,
            batch_size=batch_size,
            device="cpu",
            log_samples=True,
            task_manager=manager,
            bootstrap_iters=0,
        )
        out.seconds = time.perf_counter() - t0
    if results is None:
        raise AgreementError("lm-eval returned no results")
    accs = []
    for name in names:
        subject = name.removeprefix(TASK_PREFIX)
        for s in results["samples"][name]:
            key = (subject, int(s["doc_id"]))
            lls = [float(r[0]) for r in s["filtered_resps"]]
            out.preds[key] = max(range(len(lls)), key=lls.__getitem__)
            out.gold[key] = int(s["target"])
            reqs = _sample_requests(s)
            out.prompts[key] = reqs[0][0]
            out.continuations.add(tuple(cont for _, cont in reqs))
            accs.append(float(s["acc"]))
    out.reported_acc = sum(accs) / len(accs) if accs else None
    return out


def run_project(model_dir: Path, files: dict[str, Path], batch_size: int = 32) -> SideResult:
    """The project's importer and `score_mcq` (prompt.style mmlu), the model prepared as the eval kind does."""
    from runner.spec.models import DataSource, ModelSpec
    from runner.workloads.data.importers import import_source
    from runner.workloads.model.loading import load_model_and_tokenizer
    from runner.workloads.model.packed_attention import enable_packed_scoring
    from runner.workloads.scoring.prompts import PromptStyle, prompter
    from runner.workloads.scoring.scorer import score_mcq

    out = SideResult()
    model, tok = load_model_and_tokenizer(
        ModelSpec(base=str(model_dir), dtype="fp32"), "cpu", log=lambda m: None
    )
    enable_packed_scoring(model, "cpu")
    style = PromptStyle(style="mmlu")
    keys, records = [], []
    for subject, path in files.items():
        res = import_source(DataSource(path=str(path), format="mmlu_csv"))
        if res.problems:
            raise AgreementError(f"{path}: the project's importer reports {res.problems[0]}")
        for i, r in enumerate(res.records):
            keys.append((subject, i))
            records.append(r)
    fmt = prompter(tok, style)
    t0 = time.perf_counter()
    probs = score_mcq(model, tok, records, batch_size, prompt=style)
    out.seconds = time.perf_counter() - t0
    for key, r, p in zip(keys, records, probs.argmax(-1).tolist(), strict=True):
        out.preds[key] = int(p)
        out.gold[key] = r.answer_index
        out.prompts[key] = fmt.item_text(r)
        out.continuations.add(tuple(fmt.continuation(x) for x in LETTERS4[: len(r.choices)]))
    return out


# --- comparing ------------------------------------------------------------------------------------------------


@dataclass
class Agreement:
    questions: int
    agreement: float
    lm_eval_accuracy: float
    project_accuracy: float
    prompt_mismatches: list[tuple[str, int]]
    continuations: tuple[set[tuple[str, ...]], set[tuple[str, ...]]]  # (lm-eval's, the project's)
    texts: tuple[
        dict[tuple[str, int], str], dict[tuple[str, int], str]
    ]  # the prompts, (lm-eval's, the project's)
    disagreements: list[tuple[str, int]]

    @property
    def prompt_mismatches_beyond_whitespace(self) -> list[tuple[str, int]]:
        return [k for k in self.prompt_mismatches if _squash(self.texts[0][k]) != _squash(self.texts[1][k])]

    @property
    def accuracy_difference_points(self) -> float:
        return 100 * abs(self.lm_eval_accuracy - self.project_accuracy)


def compare(lm: SideResult, project: SideResult) -> Agreement:
    if set(lm.preds) != set(project.preds):
        only = sorted(set(lm.preds) ^ set(project.preds))[:5]
        raise AgreementError(f"the two sides read different questions (e.g. {only}); check the CSV files")
    keys = sorted(lm.preds)
    if any(lm.gold[k] != project.gold[k] for k in keys):
        raise AgreementError("the two sides read different answers for the same questions")
    n = len(keys)
    same = sum(lm.preds[k] == project.preds[k] for k in keys)
    return Agreement(
        questions=n,
        agreement=same / n,
        lm_eval_accuracy=sum(lm.preds[k] == lm.gold[k] for k in keys) / n,
        project_accuracy=sum(project.preds[k] == project.gold[k] for k in keys) / n,
        prompt_mismatches=[k for k in keys if lm.prompts[k] != project.prompts[k]],
        disagreements=[k for k in keys if lm.preds[k] != project.preds[k]],
        continuations=(lm.continuations, project.continuations),
        texts=(lm.prompts, project.prompts),
    )


def _squash(text: str) -> str:
    """A prompt as the project's importer leaves MMLU text: CR LF as LF, no spaces at the ends of lines."""
    return "\n".join(line.strip() for line in text.replace("\r\n", "\n").split("\n"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="MMLU's val/ folder (SUBJECT_val.csv files)"
    )
    ap.add_argument("--subjects", default=None, help="comma-separated subjects (default: every file)")
    ap.add_argument("--cache", type=Path, default=None, help="runner cache holding the built smollm2-135m")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--lm-eval-batch-size", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=32, help="the project's scoring batch size")
    args = ap.parse_args()
    subjects = [s.strip() for s in args.subjects.split(",") if s.strip()] if args.subjects else None
    try:
        files = subject_files(args.data, subjects)
        import lm_eval
        import torch

        from runner.workloads.model.smollm2 import ensure_smollm2

        torch.set_num_threads(args.threads)
        model_dir = ensure_smollm2(args.cache, log=lambda m: print(f"# {m}", flush=True))
        lm = run_lm_eval(model_dir, files, args.lm_eval_batch_size)
        project = run_project(model_dir, files, args.batch_size)
        a = compare(lm, project)
    except AgreementError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for k in a.disagreements[:20]:
        print(
            f"# disagree: {k[0]}/{k[1]} lm_eval={LETTERS4[lm.preds[k]]} project={LETTERS4[project.preds[k]]}"
        )
    for k in a.prompt_mismatches[:5]:
        print(f"# prompt differs: {k[0]}/{k[1]} lm_eval={lm.prompts[k]!r} project={project.prompts[k]!r}")
    print(f"lm_eval_version: {lm_eval.__version__}")
    print(f"subjects: {len(files)}")
    print(f"questions: {a.questions}")
    print(f"prompt_mismatches: {len(a.prompt_mismatches)}")
    print(f"prompt_mismatches_beyond_whitespace: {len(a.prompt_mismatches_beyond_whitespace)}")
    print(f"lm_eval_continuations: {'|'.join(sorted(' '.join(map(repr, c)) for c in a.continuations[0]))}")
    print(f"continuations_equal: {a.continuations[0] == a.continuations[1]}")
    print(f"lm_eval_agreement: {a.agreement:.4f}")
    print(f"lm_eval_accuracy: {a.lm_eval_accuracy:.4f}")
    print(f"lm_eval_reported_acc: {lm.reported_acc:.4f}")
    print(f"project_accuracy: {a.project_accuracy:.4f}")
    print(f"accuracy_difference_points: {a.accuracy_difference_points:.2f}")
    print(f"lm_eval_seconds: {lm.seconds:.1f}")
    print(f"project_seconds: {project.seconds:.1f}")
    ok = a.agreement >= 0.995 and a.accuracy_difference_points <= 0.2
    print(f"targets_met: {ok}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
