"""Preflight's memory model against the trainer it describes: the peak RSS of this project's own trainer process
(the workload entry, as `runner run` starts it, on the real smollm2-135m base) against preflight's estimate for the
same job, at two token budgets of the CPU's grouped layout and in the 4D-mask packed layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.measure_memory import CACHE, SETTINGS, measure_setting

pytestmark = [pytest.mark.slow, pytest.mark.real_model]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from runner.workloads.model.smollm2 import ensure_smollm2

    return ensure_smollm2(CACHE)


@pytest.mark.parametrize(("name", "batch", "seq", "layout"), SETTINGS, ids=[s[0] for s in SETTINGS])
def test_estimate_is_within_10_percent_of_the_trainers_peak_rss(smollm2: Path, name: str, batch: int, seq: int,
                                                               layout: str) -> None:
    res = measure_setting(name, batch, seq, layout)
    print(f"\n{name}: trainer peak RSS {res['peak_mib']} MiB, preflight {res['estimate_mib']} MiB "
          f"(x{res['ratio']}), {res['components_mib']}; peak during: {res['peak_during']!r}")
    # The peak is the training step's (after step 0's validation), not the loading's.
    assert str(res["peak_during"]).startswith("step "), res
    assert res["components_mib"]["runtime + allocator"] < 1024  # a CPU process's runtime, not a GPU context
    assert 0.9 <= float(res["ratio"]) <= 1.1, res
