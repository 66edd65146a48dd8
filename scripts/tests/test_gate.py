"""The regression gate, on the baseline kept in docs/bench."""
import copy
import json
import os

import pytest

from coregate_bench import ROOT
from coregate_bench.gate import compare

BASELINE = os.path.join(ROOT, "docs", "bench", "baseline.json")


@pytest.fixture
def baseline():
    with open(BASELINE) as f:
        return json.load(f)


def test_baseline_against_itself_passes(baseline):
    lines, failed = compare(baseline, baseline, 0.10, 0.50)
    assert not failed
    assert all(line.endswith(": ok") for line in lines)


def test_20_percent_worse_cpu_fails(baseline):
    run = copy.deepcopy(baseline)
    run["workloads"]["get-128"]["summary"]["coregate"]["cpu_x"] *= 1.2
    lines, failed = compare(run, baseline, 0.10, 0.50)
    assert failed
    assert [line for line in lines if "REGRESSED" in line] == [
        next(line for line in lines if line.startswith("get-128 CPU/request"))]


def test_5_percent_worse_cpu_passes(baseline):
    run = copy.deepcopy(baseline)
    run["workloads"]["get-128"]["summary"]["coregate"]["cpu_x"] *= 1.05
    assert not compare(run, baseline, 0.10, 0.50)[1]


def test_p99_threshold(baseline):
    run = copy.deepcopy(baseline)
    run["workloads"]["get-16k"]["summary"]["coregate"]["p99_x"] *= 1.4
    assert not compare(run, baseline, 0.10, 0.50)[1]
    assert compare(run, baseline, 0.10, 0.30)[1]


def test_missing_workloads_and_ratios_are_skipped_not_failed(baseline):
    run = copy.deepcopy(baseline)
    del run["workloads"]["get-16k"]
    run["workloads"]["get-128"]["summary"]["coregate"]["p99_x"] = float("nan")
    lines, failed = compare(run, baseline, 0.10, 0.50)
    assert not failed
    assert "get-16k: not in this run, skipped" in lines
    assert "get-128 p99: no ratio to nginx, skipped" in lines
