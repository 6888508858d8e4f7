"""Bad input to sample.py and bench.py: each ends in one line that says what was wrong, with no traceback and
nothing written. (train.py's table is in test_train.py, experiment.py's in test_experiment.py.)"""

import os
import sys

import pytest

from test_train import run, write_config


@pytest.fixture(scope="module")
def char_run(tmp_path_factory, corpora):
    """A few steps of a char-level run to sample from."""
    folder = tmp_path_factory.mktemp("char_run")
    out_dir = folder / "run"
    stages = [dict(name="one", mixture={"shakespeare": 1.0}, steps=4, seq_len=32, batch_size=2)]
    result = run([sys.executable, "train.py", write_config(folder / "c.py", out_dir, stages), "--samples=False"])
    assert result.returncode == 0, result.stderr[-2000:]
    return out_dir


@pytest.mark.parametrize("args,message", [
    (["--top_p=0"], "top_p must be in (0, 1]"),
    (["--top_p=1.5"], "top_p must be in (0, 1]"),
    (["--top_k=0"], "top_k must be >= 1"),
    (["--top_k=-2"], "top_k must be >= 1"),
    (["--max_new_tokens=-1"], "max_new_tokens must be >= 1"),
    (["--temperature=-1"], "temperature must be >= 0"),
    (["--num_samples=0"], "num_samples must be >= 1"),
    (["--checkpoint=last"], "checkpoint must be ckpt or best"),
    (["--device=banana"], "device must be auto, cpu, cuda or cuda:N"),
    (["--start=FILE:/no/such/prompt.txt"], "cannot read the prompt file"),
    (["--start=Grüße €"], "the prompt cannot be encoded: characters not in the char tokenizer's alphabet"),
    (["--out_dir=/no/such/run"], "no checkpoint at /no/such/run/ckpt.pt"),
    (["--max_new_tokens=ten"], "max_new_tokens must be int"),
])
def test_sample_bad_inputs(char_run, args, message):
    before = sorted(os.listdir(char_run))
    result = run([sys.executable, "sample.py", f"--out_dir={char_run}", "--show_experts", *args])
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert sorted(os.listdir(char_run)) == before  # (--show_experts would have written experts.png)


@pytest.mark.parametrize("args,message", [
    (["--preset=huge"], "unknown preset 'huge'"),
    (["--repeats=0"], "repeats must be >= 1"),
    (["--batch_size=0"], "batch_size must be >= 1"),
    (["--max_T=100"], "max_T must be >= 1024"),
    (["--device=banana"], "device must be auto, cpu, cuda or cuda:N"),
    (["--json=/no/such/folder/bench.json"], "the folder /no/such/folder does not exist"),
    (["--repeat=3"], "unknown setting 'repeat'"),
])
def test_bench_bad_inputs(args, message):
    result = run([sys.executable, "bench.py", *args])
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "##" not in result.stdout  # stopped before any section ran
