"""Bad input to sample.py and tools/bench.py: each ends in one line that says what was wrong, with no traceback and
nothing written. (train.py's table is in test_train.py, tools/experiment.py's in test_experiment.py.)"""

import os
import re
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
    (["--top_k=0"], "top_k must be a whole number >= 1"),
    (["--top_k=-2"], "top_k must be a whole number >= 1"),
    (["--max_new_tokens=-1"], "max_new_tokens must be >= 1"),
    (["--temperature=-1"], "temperature must be a finite number >= 0"),
    (["--num_samples=0"], "num_samples must be >= 1"),
    (["--checkpoint=last"], "checkpoint must be ckpt or best"),
    (["--device=banana"], "device must be auto, cpu, cuda or cuda:N"),
    (["--start=FILE:/no/such/prompt.txt"], "cannot read the prompt file"),
    (["--start=Grüße €"], "the prompt cannot be encoded: characters not in the char tokenizer's alphabet"),
    (["--out_dir=/no/such/run"], "no checkpoint at /no/such/run/ckpt.pt"),
    (["--max_new_tokens=ten"], "max_new_tokens must be int"),
    (["--start="], "the prompt is empty, and the char tokenizer has no end-of-text token"),
    (["--max_new_tokens=1000000000000"], "needs a KV cache of"),
    (["--device=mps"], "device must be auto, cpu, cuda or cuda:N"),
    (["--seed=-1"], "seed must be a whole number in [0, 2**32); got -1"),
    (["--out_dir=README.md"], "README.md is a file; --out_dir names the folder train.py wrote a run into"),
    (["--prompts=/no/such/prompts.txt"], "cannot read the prompt file /no/such/prompts.txt"),
    (["--prompts=/dev/null"], "the prompt file /dev/null has no prompts"),
    (["--kv_cache_mib=0"], "kv_cache_mib must be > 0"),
    (["--num_samples=2", "--show_experts"], "--show_experts shades one sample: use it with num_samples=1"),
    (["--kv_cache_mib=0.0001", "--num_samples=2"], "cannot sample: a KV budget of 104 bytes holds no"),
    (["--prompts="], "prompts must name a file of prompts; got an empty path"),
])
def test_sample_bad_inputs(char_run, args, message):
    before = sorted(os.listdir(char_run))
    shading = [] if any(a.startswith(("--num_samples", "--prompts")) for a in args) else ["--show_experts"]
    result = run([sys.executable, "sample.py", f"--out_dir={char_run}", *shading, *args])
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
    result = run([sys.executable, "-m", "tools.bench", *args])
    assert result.returncode != 0 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "##" not in result.stdout  # stopped before any section ran


@pytest.mark.parametrize("version,refused", [("2.10.1", True), ("1.13.0+cpu", True), ("2.11.0+cu130", False),
                                             ("2.13.0+cpu", False), ("3.0", False)])
def test_a_torch_older_than_the_tested_one_is_named(version, refused):
    from infra import cli
    if not refused:
        cli.require_torch(version)
        return
    with pytest.raises(SystemExit, match=f"torch {re.escape(version)} is older than 2.11"):
        cli.require_torch(version)


@pytest.mark.parametrize("args,message", [
    ([], "--nanogpt must name a nanoGPT checkout (git clone"),
    (["--nanogpt=/no/such/nanoGPT"], "/no/such/nanoGPT lacks train.py, model.py"),
    (["--nanogpt=."], ". lacks configurator.py, config/train_shakespeare_char.py"),  # (this project is no nanoGPT)
    (["--nanogpt=FAKE", "--work_dir=tests"], "work_dir tests exists: name a new folder"),
    (["--nanogpt=FAKE", "--rounds=0"], "rounds must be >= 1"),
    (["--nanogpt=FAKE", "--decode_tokens=many"], "decode_tokens must be int"),
])
def test_bench_nanogpt_bad_inputs(tmp_path, args, message):
    for name in ("train.py", "model.py", "configurator.py", "config/train_shakespeare_char.py"):  # a checkout's shape
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    args = [a.replace("FAKE", str(tmp_path)) for a in args]
    result = run([sys.executable, "-m", "tools.bench_nanogpt", *args])
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_bench_nanogpt_gives_nanogpt_the_same_text(tmp_path):
    # The files nanoGPT's shakespeare_char/prepare.py would write: its ids decode to our copy of the text, 90/10.
    import pickle
    import numpy as np
    from tools.bench_nanogpt import write_nanogpt_data
    write_nanogpt_data(str(tmp_path / "d"))
    meta = pickle.load(open(tmp_path / "d" / "meta.pkl", "rb"))
    train, val = (np.fromfile(tmp_path / "d" / f"{s}.bin", dtype=np.uint16) for s in ("train", "val"))
    text = open(os.path.join(os.path.dirname(__file__), "..", "data", "shakespeare", "input.txt")).read()
    assert meta["vocab_size"] == 65 and len(train) == int(0.9 * len(text))
    assert "".join(meta["itos"][i] for i in np.concatenate([train, val])) == text


def test_a_tiny_temperature_samples_the_most_likely_token(char_run):
    # logits / 1e-300 is 0 in float32 and gave NaN probabilities: the limit of sampling as the temperature falls is
    # greedy, and a temperature that small samples greedily.
    tiny, greedy = (run([sys.executable, "sample.py", f"--out_dir={char_run}", "--start=ROMEO:", "--max_new_tokens=20",
                         f"--temperature={t}"]) for t in ("1e-300", "0"))
    assert tiny.returncode == 0 and "Traceback" not in tiny.stderr, tiny.stderr[-2000:]
    assert tiny.stdout.split("---")[0] == greedy.stdout.split("---")[0]


def test_samples_served_together_are_each_the_sample_served_alone(char_run, tmp_path):
    """Several prompts, two samples each, through one engine batch, against each prompt sampled by itself."""
    prompts = ["ROMEO:", "JULIET: O", "First Citizen:\\nBefore"]  # (a line's \\n is a newline of the prompt)
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n\n")
    served = run([sys.executable, "sample.py", f"--out_dir={char_run}", f"--prompts={tmp_path / 'prompts.txt'}",
                  "--num_samples=2", "--temperature=0", "--max_new_tokens=25"])
    assert served.returncode == 0 and "Traceback" not in served.stderr, served.stderr[-2000:]
    assert "6 samples, 150 tokens" in served.stdout
    for i, prompt in enumerate(prompts):
        prompt = prompt.replace("\\n", "\n")
        alone = run([sys.executable, "sample.py", f"--out_dir={char_run}", f"--start={prompt}", "--temperature=0",
                     "--max_new_tokens=25"])
        text = alone.stdout.split("---")[0]  # (the prompt and its sample; then the timing line)
        for n in (1, 2):
            block = (f"--- prompt {i + 1}/3, sample {n}/2 ---\n{text.removesuffix(chr(10))}\n"
                     f"--- 25 tokens, max_new_tokens ---\n")
            assert block in served.stdout, (block, served.stdout)


def test_several_samples_stream_in_order_as_the_engine_produces_them(char_run, monkeypatch):
    """Text is printed between the engine's steps (it streams), and what prints is each sample whole, in order:
    exactly the texts of the same requests served offline."""
    import sample
    from engine import Engine, Request
    from infra.checkpoint import load_run
    events = []
    real_step = Engine.step
    monkeypatch.setattr(Engine, "step", lambda self: (events.append(None), real_step(self))[1])
    monkeypatch.setattr(sample, "print", lambda *a, end="\n", **k: events.append("".join(map(str, a)) + end),
                        raising=False)
    cfg = sample.SampleConfig(out_dir=str(char_run), start="ROMEO:", num_samples=3, max_new_tokens=40,
                              temperature=1.0)
    model, tokenizer = load_run(cfg.out_dir)
    prompt = sample.encode(tokenizer, cfg.start)
    sample.sample_all(model, tokenizer, [cfg.start], [prompt], cfg)
    steps = [i for i, e in enumerate(events) if e is None]
    texts = [i for i, e in enumerate(events) if e and not e.startswith("---") and e.strip()]
    assert sum(steps[0] < i < steps[-1] for i in texts) > 10  # printed while the engine still had steps to run
    printed = "".join(e for e in events if e is not None)
    offline = Engine(model, 10 ** 8, decode=tokenizer.decode, vocab_size=tokenizer.vocab_size).serve(
        [Request(prompt, 40, 1.0, seed=cfg.seed + n) for n in range(3)])
    for r in sorted(offline, key=lambda r: r.index):
        assert f"sample {r.index + 1}/3 ---\nROMEO:{r.text}\n--- 40 tokens, max_new_tokens ---" in printed, printed


@pytest.mark.parametrize("module", ["tools.experiment", "tools.bench", "tools.bench_nanogpt", "tools.bench_serving",
                                    "tools.bench_data", "tools.gpu_check", "infra.checkpoint", "infra.plot"])
def test_every_tool_answers_help_with_its_usage_and_success(module, capsys):
    import importlib
    try:
        importlib.import_module(module).main(["--help"])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr().out
    assert code in (0, None) and ("usage: python -m " + module in out or "settings (--key=value):" in out), out
