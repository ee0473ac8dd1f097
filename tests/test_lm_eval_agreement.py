"""`prompt.style: mmlu` scored by the project agrees with lm-evaluation-harness itself on real MMLU questions.

lm-eval runs for real (its `hf` model, offline) on a local task that includes its installed zero-shot MMLU task
file; the project reads the same CSV files through its importer and scores them with `score_mcq`
(bench/lm_eval_agreement.py does both). A slice of three subjects keeps this under a minute on 2 CPU cores;
the bench runs all of MMLU's val split.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import MMLU, ROOT

pytestmark = [pytest.mark.real_model, pytest.mark.slow, pytest.mark.lm_eval]

TEST_CACHE = Path(os.environ.get("RUNNER_TEST_CACHE", str(ROOT / ".runner" / "cache")))
# 11 questions each; college_physics has CR LF inside two questions and computer_security trailing spaces after
# choices of two, which the project's importer cleans away (the only way its prompts differ from lm-eval's)
SUBJECTS = ["abstract_algebra", "college_physics", "computer_security"]


def _bench():  # noqa: ANN202
    spec = importlib.util.spec_from_file_location("lm_eval_agreement", ROOT / "bench" / "lm_eval_agreement.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from runner.workloads.model.smollm2 import ensure_smollm2

    return ensure_smollm2(TEST_CACHE)


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval is not installed (dev extra)")
@pytest.mark.skipif(not (MMLU / "val").is_dir(), reason=f"{MMLU / 'val'} not present")
def test_mmlu_style_scores_as_lm_eval_does(smollm2: Path) -> None:
    bench = _bench()
    files = bench.subject_files(MMLU / "val", SUBJECTS)
    lm = bench.run_lm_eval(smollm2, files, batch_size=16)
    project = bench.run_project(smollm2, files, batch_size=32)
    a = bench.compare(lm, project)

    assert a.questions == 33
    # The same text before the answer and the same continuations after it: lm-eval's template, description line
    # and " A".." D" are what the project's mmlu style writes; only the importer's whitespace cleaning differs.
    assert a.prompt_mismatches_beyond_whitespace == [], [lm.prompts[k] for k in a.prompt_mismatches[:1]]
    assert sorted(a.prompt_mismatches) == [
        ("college_physics", 8), ("college_physics", 10), ("computer_security", 1), ("computer_security", 2)
    ]
    assert lm.continuations == {(" A", " B", " C", " D")} == project.continuations
    # The argmax of lm-eval's logged log-likelihoods is what lm-eval itself scored as `acc`.
    assert lm.reported_acc == pytest.approx(a.lm_eval_accuracy)
    # On 33 questions the 0.995 target means every prediction is the same, and then so is the accuracy.
    assert a.agreement >= 0.995, a.disagreements
    assert a.accuracy_difference_points <= 0.2
