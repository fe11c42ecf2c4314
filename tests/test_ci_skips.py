"""tests/ci_skips.py: under CI=true the skips of must-run tests fail; elsewhere they stay skips."""

import pytest

pytest_plugins = ["pytester"]

SUITE = '''
import pytest

def test_browser():
    pytest.skip("chromium is not on PATH")

def test_real_data():
    pytest.skip("CamVid not found at /nowhere")

@pytest.mark.skipif(True, reason="no CUDA device")
def test_gpu():
    pass
'''


@pytest.mark.parametrize("ci, failed, skipped", [("true", 2, 1), ("false", 0, 3)])
def test_skips_of_must_run_tests_fail_in_ci(pytester, monkeypatch, ci, failed, skipped):
    monkeypatch.setenv("CI", ci)
    pytester.makepyfile(SUITE)
    result = pytester.runpytest("-p", "tests.ci_skips", "-p", "no:cacheprovider")
    outcomes = result.parseoutcomes()
    assert outcomes.get("failed", 0) + outcomes.get("error", 0) == failed
    assert outcomes.get("skipped", 0) == skipped
