"""The examples run as documented (torchrun on this machine, gloo, CPU, tiny random weights)."""
import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_torchrun_dit_pipeline_two_ranks(tmp_path):
    out = tmp_path / "images.npy"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "examples/torchrun_dit_pipeline.py", "--steps", "4", "--patches", "2", "--timeout", "60",
           "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=400, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "ranks agree on the output: True" in proc.stdout
    sent, planned = re.search(r"bytes sent per step by rank 0: (\d+) \(plan: (\d+)\)", proc.stdout).groups()
    assert sent == planned and int(sent) > 0
    images = np.load(out)
    assert images.shape == (2, 32, 32, 3) and np.isfinite(images).all()
