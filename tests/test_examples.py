"""The examples run end to end (slow: each trains a base model and morphs it briefly)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.mark.slow
@pytest.mark.parametrize("script, args, expect", [
    ("quickstart.py", ["--base-epochs", "1", "--steps", "20"], "reloaded lenet5-w50.safetensors"),
    ("vae_mnist.py", ["--base-epochs", "1", "--steps", "20"], "width 0.25: MSE"),
    ("segmentation.py", ["--base-epochs", "1", "--epochs", "1"], "unet-w50.safetensors ("),
    ("timm_model.py", ["--model", "mobilenetv3_small_100", "--base-epochs", "1", "--steps", "2"], "width 0.50:"),
])
def test_example_runs(script, args, expect, tmp_path):
    out = subprocess.run([sys.executable, str(EXAMPLES / script), *args], cwd=tmp_path, capture_output=True,
                         text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert expect in out.stdout, out.stdout[-3000:]
