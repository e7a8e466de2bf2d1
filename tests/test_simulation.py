"""The promise, proven by simulation: under every fault, every expected slot ends as a record.

Each seed draws a plan (tests/sim/plan.py): configuration, Finnhub and Kinesis faults, a full
disk or spool, pauses, SIGTERMs and SIGKILLs with restarts. The real App runs it on virtual
time (tests/sim/harness.py), minutes of it in a fraction of a second. CI runs
FINNSTREAM_SIM_SEEDS seeds (default 40); `FINNSTREAM_SIM_SEEDS=2000 pytest
tests/test_simulation.py` runs many more, and `FINNSTREAM_SIM_SEED=<n>` replays one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from .sim.harness import Simulation
from .sim.plan import Plan

FIRST = int(os.environ.get("FINNSTREAM_SIM_FIRST_SEED", "0"))
COUNT = int(os.environ.get("FINNSTREAM_SIM_SEEDS", "40"))
ONE = os.environ.get("FINNSTREAM_SIM_SEED")
SEEDS = [int(ONE)] if ONE else list(range(FIRST, FIRST + COUNT))


@pytest.mark.parametrize("seed", SEEDS)
def test_every_expected_slot_ends_as_a_record(seed: int, tmp_path: Path) -> None:
    outcome = Simulation(Plan.generate(seed), tmp_path).run()
    assert not outcome.problems, outcome.report()
    assert outcome.delivered > 0


def test_a_seed_replays_exactly(tmp_path: Path) -> None:
    """Same seed, same run: the records Kinesis took, in order, and every process end."""
    runs = []
    for attempt in ("a", "b"):
        sim = Simulation(Plan.generate(11), tmp_path / attempt)
        outcome = sim.run()
        runs.append(
            (
                [(r["symbol"], r["minute"], r["source"]) for r in sim.kinesis.accepted],
                [(e.how, e.at) for e in outcome.ends],
            )
        )
    assert runs[0] == runs[1]
