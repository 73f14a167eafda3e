"""How OpenMP threads wait: spin briefly on idle cores, sleep when other processes keep them busy."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from DeepSalRegLib import threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("busy, threads_wanted, expected", [
    (0.0, 2, "spin"), (0.2, 2, "spin"), (0.9, 2, "passive"), (1.8, 2, "passive"),
    (0.9, 1, "passive"),  # one thread never waits for another: nothing to gain from spinning
])
def test_the_policy_follows_the_load_of_the_cores_this_process_would_use(monkeypatch, busy, threads_wanted, expected):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda window_s=0.1: busy)
    env = {"OMP_NUM_THREADS": str(threads_wanted)}
    assert threads.choose_wait_policy(env) == expected
    if expected == "spin":
        assert env["GOMP_SPINCOUNT"] == threads.SPIN_COUNT and "OMP_WAIT_POLICY" not in env
    else:
        assert env["OMP_WAIT_POLICY"] == "PASSIVE" and "GOMP_SPINCOUNT" not in env


def test_a_policy_the_user_set_is_kept_and_one_inherited_from_a_deciding_parent_is_chosen_again(monkeypatch):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(threads, "busy_cores", lambda window_s=0.1: 1.5)
    for user in ({"OMP_WAIT_POLICY": "ACTIVE"}, {"GOMP_SPINCOUNT": "1000"}):
        env = dict(user)
        assert threads.choose_wait_policy(env) == "user" and env == user
    parent = {}
    monkeypatch.setattr(threads, "busy_cores", lambda window_s=0.1: 0.0)
    assert threads.choose_wait_policy(parent) == "spin"
    child = dict(parent)  # the machine got busy before the child started
    monkeypatch.setattr(threads, "busy_cores", lambda window_s=0.1: 1.5)
    assert threads.choose_wait_policy(child) == "passive"
    assert "GOMP_SPINCOUNT" not in child and child["OMP_WAIT_POLICY"] == "PASSIVE"


def test_without_a_load_measure_the_load_average_decides(monkeypatch):
    monkeypatch.setattr(threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda window_s=0.1: None)
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (3.0, 3.0, 3.0))
    assert threads.choose_wait_policy({}) == "passive"
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.1, 0.5, 0.5))
    assert threads.choose_wait_policy({}) == "spin"


@pytest.mark.skipif(not Path("/proc/stat").is_file(), reason="busy_cores reads Linux /proc/stat")
def test_a_process_that_keeps_a_core_busy_is_seen_and_makes_the_command_line_sleep():
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert threads.busy_cores(0.3) >= 0.7  # the spinner's core, whatever else the machine runs
        # the command line's own choice, made before torch is imported, in a fresh process
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
        env["OMP_NUM_THREADS"] = str(os.cpu_count())
        code = ("import sys, os; from DeepSalRegLib.cli import main\n"
                "try: main(['--help'])\nexcept SystemExit: pass\n"
                "assert 'torch' not in sys.modules\n"
                "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('DEEPSALREG_WAIT_POLICY'))")
        out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True,
                             timeout=120)
        assert out.stdout.split()[-2:] == ["PASSIVE", "passive"], out.stdout + out.stderr
    finally:
        spinner.kill()
        spinner.wait()
