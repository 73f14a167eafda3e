"""Two-process data-parallel training with torchrun on CPU (gloo): one checkpoint, equal weights on every rank."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from DeepSalRegLib.networks import load_checkpoint
from training import make_dataset
from training.checkpoints import load_state, weights_digest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
def test_torchrun_two_cpu_processes(tmp_path):
    data = tmp_path / "syn.h5"
    assert make_dataset.main([str(data), "--synthetic", "8", "--shape", "24", "24", "--val-fraction", "0.25"]) == 0
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "training" / "train.py"), "--data", str(data), "--out", str(out), "--steps", "3", "--backend", "gloo",
           "--set", "model.overrides={global_widths: [[4, 4], [8, 8], [8, 8]], local_widths: [4, 4], local_dilations: [1, 2, 1]}",
           "--set", "train.batch_size=2", "--set", "train.checkpoint_every=2", "--set", "train.val_every=2",
           "--set", "data.val_samples=2", "--set", "train.tensorboard=false", "--set", "train.progress=false",
           "--set", "train.threads=1", "--set", "data.flip=0.5"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert proc.stdout.count("trained 3 steps") == 1  # only rank 0 reports
    # every rank ended with the same weights (DDP averages gradients), and rank 0's files hold them
    digests = {p.name: p.read_text().strip() for p in out.glob("rank*.sha256")}
    assert sorted(digests) == ["rank0.sha256", "rank1.sha256"]
    assert len(set(digests.values())) == 1
    assert weights_digest(load_checkpoint(out / "last.pt")[0]) == digests["rank0.sha256"]
    # one checkpoint written (by rank 0), with the position after 3 steps of the 2-process run
    assert sorted(p.name for p in out.glob("*.pt")) == ["last.pt", "model.pt", "state.pt"]
    state = load_state(out / "state.pt")
    assert state["position"]["step"] == 3
    assert not list(out.glob(".*.tmp"))
