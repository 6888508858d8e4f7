"""tools/gpu_check.py's dry run: every part runs at a tiny size on the CPU (or says it needs CUDA), so the GPU check
cannot rot between the rare times a GPU is lent; and a part that fails is reported while the rest run on."""

import sys

import pytest
import torch

from test_train import run

PARTS = ("tests", "train", "attention", "experts", "decode", "serving", "torchrun")


def test_the_dry_run_runs_every_part(corpora):
    result = run([sys.executable, "-m", "tools.gpu_check", "--dry=True", "--steps=4", "--repeats=1"])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    rows = {line.split(" | ")[0].strip("| "): line for line in result.stdout.splitlines() if line.startswith("| ")}
    assert set(PARTS) <= set(rows), result.stdout
    assert "| skipped | needs CUDA" in rows["tests"]
    for part in PARTS[1:]:  # everything else has a CPU version
        assert f"| {part} | ok |" in rows[part], rows[part]
    assert "tokens/s" in rows["train"] and "vs masked SDPA" in rows["attention"] and "gloo" in rows["torchrun"]
    assert "greedy tokens equal to generate's: 192/192" in rows["serving"]  # (fp32 on the CPU: exactly)


def test_a_failing_part_is_reported_and_the_others_still_run():
    from tools import gpu_check

    def broken():
        raise RuntimeError("out of memory\nsecond line")

    rows = [gpu_check.run_part("a", broken), gpu_check.run_part("b", lambda: "fine")]
    assert rows[0][:3] == ("a", "FAILED", "RuntimeError: out of memory") and rows[1][:3] == ("b", "ok", "fine")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_without_a_gpu_the_full_check_says_so():
    result = run([sys.executable, "-m", "tools.gpu_check"])
    assert result.returncode == 1 and "no CUDA GPU here: run with --dry=True" in result.stderr
    assert "Traceback" not in result.stderr
