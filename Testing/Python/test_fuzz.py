"""Bounded fuzzing of the volume and label readers, the prompt parser and the project and
round loaders: every generated input gives a result or a clean InputError, nothing else.
(The same targets run with a large budget in Testing/Benchmarks/bench_reliability.py.)"""
import os
import tempfile
from pathlib import Path

import pytest
from fuzz_targets import TARGETS
from hypothesis import HealthCheck, given, settings

EXAMPLES = int(os.environ.get("ALSEG_FUZZ_EXAMPLES", "60"))


@pytest.mark.parametrize("name", sorted(TARGETS))
def test_fuzz(name):
    strategy, target = TARGETS[name]
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)

        @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(strategy)
        def run(value):
            outcomes.append(target(value, folder))

        run()
    assert len(outcomes) >= EXAMPLES // 2
    assert "error" in outcomes and "ok" in outcomes  # both sides of the readers' checks are reached
