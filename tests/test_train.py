import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(n_layer=4, n_head=2, n_kv_head=1, n_embd=32, block_size=64, window=8, attn_pattern="LG",
            share_kv=True, n_experts=4, expert_hidden=16, mlp_hidden=64, compile=False, plots=False,
            eval_iters=1, arith_per_level=2, seed=7, tokenizer="char")
STAGES = [
    dict(name="one", mixture={"shakespeare": 1.0}, steps=8, seq_len=32, batch_size=4, warmup=2, lr_end=0.5),
    dict(name="two", mixture={"shakespeare": 1.0}, steps=6, seq_len=48, batch_size=2, lr_end=0.1,
         decay="cosine", router={"top_p": 0.7}, rope_base=50000.0),
]


def write_config(path, out_dir, stages=STAGES, **overrides):
    settings = {**TINY, "out_dir": str(out_dir), "stages": stages, "log_interval": 1, "eval_interval": 1000,
                "ckpt_interval": 3, **overrides}
    path.write_text("".join(f"{k} = {v!r}\n" for k, v in settings.items()))
    return str(path)


def run(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, **kwargs)


def train_records(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["kind"] == "train"]


def test_every_stage_ends_at_its_lr_end():
    from train import Stage, lr_at
    stages = [Stage("a", {"x": 1}, steps=3, warmup=2, lr_end=0.1)]
    assert [lr_at(stages, 0, i) for i in range(3)] == pytest.approx([0.5, 1.0, 0.1])
    stages.append(Stage("b", {"x": 1}, steps=1, lr_end=0.02, decay="cosine"))
    assert lr_at(stages, 1, 0) == pytest.approx(0.02)
    # (a warmup as long as its stage is refused where the stage's steps are known: load_config, in the table below)


def test_sigkill_and_resume_gives_the_same_final_loss(corpora, tmp_path):
    straight = write_config(tmp_path / "a.py", tmp_path / "a")
    assert run([sys.executable, "train.py", straight]).returncode == 0
    expected = train_records(tmp_path / "a")

    killed = write_config(tmp_path / "b.py", tmp_path / "b")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "train.py", killed], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "b" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:  # kill mid-stage, after the checkpoint at step 3 and before the next one
        if metrics.exists() and any(json.loads(line)["step"] >= 4 for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    state = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)["state"]
    assert state["global_step"] < 14, "the run finished before it could be killed"
    with open(metrics, "a") as f:  # a line cut short by the kill, as a kill during a write leaves it
        f.write('{"kind": "train", "step": 99, "lo')
    resumed = run([sys.executable, "train.py", killed])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming" in resumed.stdout
    got = train_records(tmp_path / "b")
    assert [r["step"] for r in got] == list(range(1, 15))
    assert got[-1]["loss"] == expected[-1]["loss"]  # bitwise: same state, same batches, deterministic CPU ops
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]
    # Without its metrics.jsonl the run still resumes from the checkpoint (the log starts afresh).
    os.remove(metrics)
    again = run([sys.executable, "train.py", killed])
    assert again.returncode == 0 and "resuming" in again.stdout, again.stderr[-2000:]


def test_stage_transitions_happen_at_the_configured_step(corpora, tmp_path):
    config = write_config(tmp_path / "c.py", tmp_path / "c")
    result = run([sys.executable, "train.py", config])
    assert result.returncode == 0, result.stderr[-3000:]
    records = train_records(tmp_path / "c")
    first, second = records[:8], records[8:]
    assert [r["stage"] for r in first] == [0] * 8 and [r["stage"] for r in second] == [1] * 6
    assert {r["seq_len"] for r in first} == {32} and {r["seq_len"] for r in second} == {48}
    assert {r["batch_size"] for r in first} == {4} and {r["batch_size"] for r in second} == {2}
    assert all(p == 0.4 for r in first for p in r["top_p"]) and all(p == 0.7 for r in second for p in r["top_p"])
    assert {r["rope_base"] for r in first} == {10000.0} and {r["rope_base"] for r in second} == {50000.0}
    peak = 1e-3
    # stage 1: warmup over 2 steps up to 1.0, then linear to 0.5 at its last step; stage 2 goes on from 0.5
    # (without repeating it), cosine to 0.1 at its last step
    assert [r["lr"] / peak for r in first] == pytest.approx([0.5, 1.0] + [1 - 0.5 * i / 6 for i in range(1, 7)])
    assert [r["lr"] / peak for r in second] == pytest.approx(
        [0.5 - 0.4 * 0.5 * (1 - math.cos(math.pi * i / 6)) for i in range(1, 7)])
    assert records[7]["tokens"] == 8 * 4 * 32 and records[8]["tokens"] == 8 * 4 * 32 + 2 * 48


def stage(**settings):
    return {"name": "a", "mixture": {"shakespeare": 1}, "steps": 3, "seq_len": 16, **settings}


def stages_arg(*stages):
    return [f"--stages={list(stages)!r}"]


@pytest.mark.parametrize("args,message", [
    (["--n_layr=4"], "unknown setting 'n_layr'"),
    (["--lr=fast"], "lr must be float"),
    (["--lr=-1"], "lr must be > 0"),
    (stages_arg(stage(mixture={})), "mixture must name at least one corpus"),
    (stages_arg(stage(seq_len=4096)), "exceeds block_size"),
    (stages_arg(stage(mixture={"nope": 1})), "unknown corpus 'nope'"),
    (["--n_embd=30", "--n_head=4"], "divisible by n_head"),
    (stages_arg(stage(), stage(name="last", router={"routing": "top_k", "top_k": 99})),
     "stage 'last': top_k (99) cannot exceed n_experts (4)"),
    (stages_arg(stage(router={"top_pp": 0.5})), "stage 'a': unknown router setting(s) ['top_pp']"),
    (stages_arg(stage(router={"top_p": "0.5"})), "stage 'a': router setting top_p must be float"),
    (stages_arg(stage(warmup=3)), "warmup (3) must be shorter than the stage"),
    (["--batch_size=4"], "'batch_size' in --batch_size is a setting of each stage"),
    (["--router.top_k=5"], "top_k (5) cannot exceed n_experts (4)"),
    (["--top_p=0.5"], "unknown setting 'top_p' in --top_p; did you mean router.top_p?"),  # (sample.py's name)
    (["--router.top_pp=0.5"], "unknown setting 'router.top_pp' in --router.top_pp; did you mean router.top_p"),
    (["--router.top_p=high"], "router.top_p must be float"),
    (["--device=banana"], "device must be auto, cpu, cuda or cuda:N"),
    pytest.param(["--device=cuda"], "torch sees no CUDA GPU here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")),
    (["--tokenizer=bpe"], "tokenizer must be one of byte, gpt2, char"),
    (stages_arg(stage(steps=0)), "the budget must be >= 1"),
    (stages_arg(stage(steps=2.5)), "stage 'a': steps must be int; got 2.5"),
    (stages_arg(stage(seq_len="16")), "stage 'a': seq_len must be int; got '16'"),
    (stages_arg(stage(window=0)), "stage 'a': window must be >= 1; got 0"),
    (stages_arg(stage(windw=4)), "stage 'a': unknown key(s) ['windw']"),
    (stages_arg(stage(name="")), "a stage needs a name"),
    (["--lr=1e999"], "lr must be a finite number; got inf"),
    (["--norm_eps=1e999"], "norm_eps must be a finite number; got inf"),
    (["--norm_eps=0"], "norm_eps must be in (0, 1); got 0.0"),
    (["--init_std=0"], "init_std must be in (0, 1); got 0.0"),
    (["--router.z_loss=1e999"], "router.z_loss must be a finite number; got inf"),
    (["--stages=[{'name': 'a', 'mixture': {'shakespeare': 1}, 'steps': 3, "
      "'seq_len': 16, 'lr_end': 1e999}]"], "stage 'a': lr_end must be a finite number; got inf"),
    (["--stages=[{'name': 'a', 'mixture': {'shakespeare': 1}, 'steps': 3, "
      "'seq_len': 16, 'rope_base': 'big'}]"], "stage 'a': rope_base must be float; got 'big'"),
    (["--stages=[{'name': 'a', 'mixture': {'shakespeare': 1}, 'steps': 3, "
      "'seq_len': 16, 'router': {'balance_loss': 1e999}}]"],
     "router setting balance_loss must be a finite number; got inf"),
    (["--stages=[{'name': 'a', 'mixture': {'shakespeare': 1e999}, 'steps': 3, 'seq_len': 16}]"],
     "stage 'a': mixture weight of 'shakespeare' must be a positive finite number; got inf"),
    (["--tokenizer=byte", "--stages=[{'name': 'a', 'mixture': {'shakespeare': 1e308, 'code': 1e308}, 'steps': 3, "
      "'seq_len': 16}]"],
     "the mixture's weights must sum to a finite number"),
    (["--device=mps"], "device must be auto, cpu, cuda or cuda:N; got 'mps'"),
    (["--device=meta"], "device must be auto, cpu, cuda or cuda:N; got 'meta'"),
    (["--out_dir="], "out_dir must name a folder"),
    (["--out_dir=README.md"], "out_dir README.md is a file, not a folder"),
    (["--out_dir=README.md/run"], "cannot write in out_dir README.md/run"),
    (["--seed=-1"], "seed must be a whole number in [0, 2**32); got -1"),
    ([f"--seed={2 ** 64}"], "seed must be a whole number in [0, 2**32)"),
    (["--n_layer=64", "--n_embd=16384", "--n_head=64", "--n_kv_head=64"], "GiB per rank, and"),  # (about 200e9)
])
def test_bad_configs_stop_with_a_message_and_write_nothing(corpora, tmp_path, monkeypatch, args, message):
    # In this process (a subprocess per case took minutes of CI): a SystemExit carrying a one-line message is what
    # train.py prints as its one line, with exit code 1; the test below checks that end to end for two cases.
    import train
    monkeypatch.chdir(ROOT)
    out_dir = tmp_path / "never"
    config = write_config(tmp_path / "bad.py", out_dir)
    with pytest.raises(SystemExit) as stop:
        train.main([config, f"--out_dir={out_dir}"] + args)
    assert isinstance(stop.value.code, str) and message in stop.value.code and "\n" not in stop.value.code, \
        stop.value.code
    assert not out_dir.exists()


@pytest.mark.parametrize("args,message", [(["--lr=-1"], "config error: lr must be > 0"),
                                          (["--out_dir=README.md"], "out_dir README.md is a file, not a folder")])
def test_a_bad_setting_is_one_line_on_stderr_and_exit_code_1(corpora, tmp_path, args, message):
    result = run([sys.executable, "train.py", write_config(tmp_path / "bad.py", tmp_path / "never")] + args)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert message in result.stderr and not (tmp_path / "never").exists()


def test_router_settings_in_a_config_file_are_one_dict(corpora, tmp_path):
    # router = dict(...) sets the router's settings from the start; a bare top_k (sample.py's name) is refused.
    config = write_config(tmp_path / "r.py", tmp_path / "r", stages=[{**STAGES[0], "steps": 3, "warmup": 1}],
                          router={"routing": "top_k", "top_k": 3})
    result = run([sys.executable, "train.py", config])
    assert result.returncode == 0, result.stderr[-2000:]
    assert {(r["routing"][0], r["experts_per_token"][0]) for r in train_records(tmp_path / "r")} == {("top_k", 3.0)}
    bare = write_config(tmp_path / "b.py", tmp_path / "b", top_k=3)
    result = run([sys.executable, "train.py", bare])
    assert result.returncode == 1 and "did you mean router.top_k?" in result.stderr and not (tmp_path / "b").exists()


def test_a_config_file_that_exits_is_refused(corpora, tmp_path):
    config = tmp_path / "exits.py"
    config.write_text("import sys\nsys.exit(0)\n")
    result = run([sys.executable, "train.py", str(config), f"--out_dir={tmp_path / 'never'}"])
    assert result.returncode == 1 and f"config file {config} called sys.exit(0)" in result.stderr, result.stderr
    assert not (tmp_path / "never").exists()
    config.write_text("raise KeyboardInterrupt\n")  # (the file's own doing, not a Ctrl-C)
    result = run([sys.executable, "train.py", str(config), f"--out_dir={tmp_path / 'never'}"])
    assert result.returncode == 1 and "raised KeyboardInterrupt while it ran" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "never").exists()


def test_syntax_error_in_a_config_file_names_file_and_line(corpora, tmp_path):
    config = tmp_path / "broken.py"
    config.write_text("lr = 1e-3\nstages = [dict(name='a',\n")
    result = run([sys.executable, "train.py", str(config)])
    assert result.returncode != 0 and f"syntax error in config file {config}, line" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("script,setting", [("train.py", "--eval_seq_len"), ("train.py", "--router.top_p"),
                                            ("train.py", "--n_kv_head"), ("sample.py", "--top_p"),
                                            ("-m tools.bench", "--repeats"), ("-m tools.experiment", "--seeds")])
def test_help_lists_every_setting_with_its_meaning(script, setting):
    result = run([sys.executable, *script.split(), "--help"])
    assert result.returncode == 0 and "Traceback" not in result.stderr
    line = next(line for line in result.stdout.splitlines() if line.strip().startswith(setting + " "))
    assert "default" in line and len(line.split(")", 1)[1].strip()) > 10, line  # a meaning follows


def test_resume_at_a_stage_boundary_and_the_routing_and_window_travel(corpora, tmp_path, monkeypatch):
    # The last stage switches to top-3 routing and shrinks the local layers' window from 8 to 3. A run stopped right
    # after the checkpoint that closes stage one resumes into stage two exactly, and checkpoint.load_run rebuilds the
    # model routing and attending as it last trained: its KV cache decodes as a full recompute does.
    from infra import checkpoint
    import train
    stages = [STAGES[0], {**STAGES[1], "router": {"routing": "top_k", "top_k": 3}, "window": 3}]
    torch.set_num_threads(1)  # in-process runs, compared bit for bit
    evals = []
    real_val_loss = train.evaluation.val_loss
    monkeypatch.setattr(train.evaluation, "val_loss", lambda model, tok, corpora, seq_len, batch_size, *rest:
                        evals.append((seq_len, batch_size)) or real_val_loss(model, tok, corpora, seq_len, batch_size,
                                                                             *rest))
    train.main([write_config(tmp_path / "a.py", tmp_path / "a", stages=stages, ckpt_interval=1000)])
    assert evals == [(48, 8), (48, 8)]  # the same val batches at every evaluation, whatever the stage's shape

    real_save = train.Trainer.save_checkpoint

    def save_then_die(self, loader):
        real_save(self, loader)
        raise SystemExit("killed right after the checkpoint at the stage boundary")

    config = write_config(tmp_path / "b.py", tmp_path / "b", stages=stages, ckpt_interval=1000)
    monkeypatch.setattr(train.Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(SystemExit, match="killed"):
        train.main([config])
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["state"]["stage"] == 1
    monkeypatch.setattr(train.Trainer, "save_checkpoint", real_save)
    train.main([config])
    assert [r["loss"] for r in train_records(tmp_path / "b")] == [r["loss"] for r in train_records(tmp_path / "a")]
    assert {r["routing"][0] for r in train_records(tmp_path / "b")[8:]} == {"top_k"}

    model, _ = checkpoint.load_run(str(tmp_path / "b"))
    assert all(m.config.routing == "top_k" and m.config.top_k == 3 for m in model.moe_layers())
    _, _, parts = model(torch.zeros(1, 5, dtype=torch.long), parts=True)
    assert all((r.experts_per_token == 3).all() for r in parts.routing)
    assert [r["window"] for r in train_records(tmp_path / "b")] == [8] * 8 + [3] * 6
    assert model.window == 3 and model.blocks[0].attn.window == 3 and model.make_cache(1, 40).k[0].shape[2] == 3
    idx = torch.tensor([[5, 17, 3, 40, 22, 9]])
    seq = idx
    with torch.no_grad():
        for _ in range(20):  # the whole context again at every step: the local layers' window of 3 by its mask
            seq = torch.cat([seq, model(seq)[0][:, -1, :65].argmax(-1, keepdim=True)], 1)
    assert torch.equal(model.generate(idx, 20, temperature=0, vocab_size=65), seq)
    from engine import Engine, Request
    served = next(Engine(model, 10 ** 6, vocab_size=65).serve([Request(idx[0].tolist(), 20)]))
    assert served.tokens == seq[0, 6:].tolist()

    # The vocabulary is padded from 65 to 128 ids; sampling never picks a padding id, so decoding works.
    shown = run([sys.executable, "sample.py", f"--out_dir={tmp_path / 'b'}", "--start=ROMEO:", "--max_new_tokens=30",
                 "--temperature=2.0", "--show_experts"])
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "\x1b[48;2;" in shown.stdout and (tmp_path / "b" / "experts.png").stat().st_size > 1000


def test_a_byte_level_run_shows_what_it_learned(corpora, tmp_path):
    stages = [dict(name="mixed", mixture={"shakespeare": 1.0, "code": 0.5, "arith": 1.0, "recall": 0.5}, steps=4,
                   seq_len=32, batch_size=4),
              dict(name="last", mixture={"arith": 1.0}, steps=2, seq_len=32, batch_size=4)]
    config = write_config(tmp_path / "s.py", tmp_path / "s", stages=stages, tokenizer="byte", samples=True,
                          plots=True)
    result = run([sys.executable, "train.py", config])
    assert result.returncode == 0, result.stderr[-2000:]
    for text in ("--- shakespeare ---", "--- code ---", "--- arith", "level 5:", "at the end of each stage",
                 "mixed", "last"):
        assert text in result.stdout, text
    evals = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    assert set(evals[-1]["val_bpb"]) == {"shakespeare", "code", "arith", "recall"}
    assert set(evals[-1]["arith_accuracy"]["level"]) == {"1", "2", "3", "4", "5"}
    recall = evals[-1]["recall"]  # (TINY: window 8, 4 layers: edges 8, 4 windows = layers x window = 32)
    assert list(recall["count"]) == ["<8", "8-31", ">=32"] and recall["count"][">=32"] == 0  # (rows of 32 bytes)
    assert recall["count"]["<8"] > 100 and recall["count"]["8-31"] > 100 and 0 <= recall["all"] <= 1
    assert (tmp_path / "s" / "plots" / "recall.png").is_file()


def test_nan_stops_the_run_and_keeps_the_last_checkpoint(corpora, tmp_path, monkeypatch):
    import model
    import train
    real_forward = model.GPT.forward
    calls = {"n": 0}

    def poisoned(self, idx, targets=None, cache=None, parts=False):
        logits, loss, loss_parts = real_forward(self, idx, targets, cache, parts=True)
        if targets is not None and self.training:
            calls["n"] += 1
            if calls["n"] == 5:  # the 5th training step
                loss = loss * float("nan")
        return (logits, loss, loss_parts) if parts else (logits, loss)

    monkeypatch.setattr(model.GPT, "forward", poisoned)
    config = write_config(tmp_path / "n.py", tmp_path / "n")
    with pytest.raises(SystemExit) as stop:
        train.main([config])
    assert "non-finite loss" in str(stop.value.code) and "global step 4" in str(stop.value.code)
    assert f"The last good checkpoint is {tmp_path / 'n' / 'ckpt.pt'} (global step 3)." in str(stop.value.code)
    ckpt = torch.load(tmp_path / "n" / "ckpt.pt", weights_only=False)
    assert ckpt["state"]["global_step"] == 3
    fresh = model.GPT(model.GPTConfig(**ckpt["model_config"]), verbose=False)
    fresh.load_state_dict(ckpt["model"])
    assert all(torch.isfinite(p).all() for p in fresh.parameters())


def test_the_last_checkpoint_named_is_the_sharded_folder_for_a_sharded_run(tmp_path):
    from infra.checkpoint import last_checkpoint
    assert last_checkpoint(str(tmp_path), sharded=False) is None and last_checkpoint(str(tmp_path), True) is None
    (tmp_path / "ckpt.pt").write_bytes(b"")  # (a sharded run's consolidated file is no resumable checkpoint)
    (tmp_path / "sharded" / "step_000000012").mkdir(parents=True)
    (tmp_path / "sharded" / "latest").write_text("step_000000012")
    assert last_checkpoint(str(tmp_path), sharded=True) == str(tmp_path / "sharded" / "step_000000012")
    assert last_checkpoint(str(tmp_path), sharded=False) == str(tmp_path / "ckpt.pt")


def test_a_resume_on_another_device_names_what_changed(corpora, tmp_path):
    # dtype="auto" and compile=None follow the device: a CPU run resumed on CUDA would switch to bf16 and compile.
    # No GPU here, so the checkpoint is made to say it came from one; the resume must name each change.
    config = write_config(tmp_path / "d.py", tmp_path / "d", stages=[STAGES[0]])
    assert run([sys.executable, "train.py", config]).returncode == 0
    path = tmp_path / "d" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    assert ckpt["runtime"] == {"device": "cpu", "dtype": "float32", "compile": False}
    result = run([sys.executable, "train.py", config])
    assert result.returncode == 0 and "resuming with" not in result.stdout  # nothing changed
    ckpt["runtime"] = {"device": "cuda", "dtype": "bfloat16", "compile": True}
    torch.save(ckpt, path)
    result = run([sys.executable, "train.py", config])
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming with device cuda -> cpu, dtype bfloat16 -> float32, compile True -> False" in result.stdout


def test_mismatched_and_corrupt_checkpoints_are_refused(corpora, tmp_path):
    config = write_config(tmp_path / "m.py", tmp_path / "m", stages=[STAGES[0]])
    assert run([sys.executable, "train.py", config]).returncode == 0
    files = {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()}
    changed_router = "--stages=[" + repr({**STAGES[0], "router": {"top_p": 0.5}}) + "]"
    for args, names in [(["--n_embd=64"], ["n_embd"]), (["--lr=2e-3", "--beta2=0.99"], ["lr", "beta2"]),
                        (["--seed=8", "--weight_decay=0.0"], ["seed", "weight_decay"]),
                        (["--grad_clip=0.5", "--dtype=bfloat16"], ["grad_clip", "dtype"]),
                        (["--router.entropy_loss=0.0"], ["router"]), ([changed_router], ["stages"])]:
        other = run([sys.executable, "train.py", config] + args)
        assert other.returncode != 0 and "different run" in other.stderr, other.stderr[-2000:]
        for name in names:
            assert f"\n  {name}: checkpoint" in other.stderr, (name, other.stderr)
        assert {p.name: p.read_bytes() for p in (tmp_path / "m").iterdir()} == files  # nothing written
    # Settings that change neither the math nor the evaluation may change: the finished run just resumes.
    same = run([sys.executable, "train.py", config, "--log_interval=5", "--ckpt_interval=7", "--eval_interval=9"])
    assert same.returncode == 0 and "resuming" in same.stdout, same.stderr[-2000:]
    (tmp_path / "m" / "ckpt.pt").write_bytes(b"not a checkpoint")
    corrupt = run([sys.executable, "train.py", config])
    assert corrupt.returncode != 0 and "cannot read checkpoint" in corrupt.stderr


def test_checkpoints_load_without_running_code(corpora, tmp_path):
    # A checkpoint whose pickle would run code (here: os.system) is refused; train.py's own files load
    # with weights_only=True.
    config = write_config(tmp_path / "w.py", tmp_path / "w", stages=[STAGES[0]])
    assert run([sys.executable, "train.py", config]).returncode == 0
    torch.load(tmp_path / "w" / "ckpt.pt", weights_only=True)
    torch.load(tmp_path / "w" / "best.pt", weights_only=True)

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    ckpt = torch.load(tmp_path / "w" / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "state": Evil()}, tmp_path / "w" / "ckpt.pt")
    result = run([sys.executable, "train.py", config])
    assert result.returncode != 0 and "cannot read checkpoint" in result.stderr
    assert not (tmp_path / "pwned").exists()


def test_sigterm_saves_and_exits_cleanly(corpora, tmp_path):
    long_stage = [dict(name="long", mixture={"shakespeare": 1.0}, steps=100000, seq_len=32, batch_size=4)]
    config = write_config(tmp_path / "t.py", tmp_path / "t", stages=long_stage, ckpt_interval=100000)
    proc = subprocess.Popen([sys.executable, "train.py", config], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "t" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]  # saved, but not complete: not 0
    assert "stopped by signal" in out
    state = torch.load(tmp_path / "t" / "ckpt.pt", weights_only=False)["state"]
    assert state["global_step"] >= 3


def test_mfu_from_the_measured_routing_and_the_exact_gpu():
    from model import GPT, make_config
    from infra.evaluation import flops_per_token, mfu, peak_flops
    assert peak_flops("NVIDIA H100 80GB HBM3") == 989e12 and peak_flops("NVIDIA H100 PCIe") == 756e12
    assert peak_flops("NVIDIA H100 NVL") == 835e12 and peak_flops("NVIDIA L40S") == 362e12
    assert peak_flops("NVIDIA A10G") is None and peak_flops("NVIDIA L4") == 121e12
    config = make_config(dict(vocab_size=64, block_size=32, n_layer=4, n_head=2, n_kv_head=1, n_embd=16, window=8,
                              n_experts=8, expert_hidden=8, attn_pattern="LLLG"))
    model = GPT(config, verbose=False)
    per_expert = 3 * 16 * 8
    measured = [2.0, 3.0, 4.0]  # three MoE layers
    active = model.num_params(active=True, experts_per_token=measured)
    assert active == model.num_params(active=True, experts_per_token=0) + per_expert * 9
    # 6 per active parameter, plus 12 * n_embd * keys: 8 keys for the three local layers, 32 for the global
    assert flops_per_token(config, active, 32) == 6 * active + 12 * 16 * (3 * 8 + 32)
    assert mfu(1e9, 1e4, 1e14, world_size=2) == pytest.approx(1e13 / 2e14)
    assert mfu(1e9, 1e4, None) is None


def test_a_second_run_in_a_live_runs_out_dir_stops_and_a_stale_lock_does_not(corpora, tmp_path):
    config = write_config(tmp_path / "c.py", tmp_path / "run", stages=[STAGES[0]])
    (tmp_path / "run").mkdir()
    lock = tmp_path / "run" / "train.lock"
    lock.write_text(str(os.getpid()))  # this test's process: alive
    result = run([sys.executable, "train.py", config, "--samples=False"])
    assert result.returncode != 0 and f"in use by another run (PID {os.getpid()}" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and sorted(os.listdir(tmp_path / "run")) == ["train.lock"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(str(dead.pid))  # a run killed without its cleanup leaves a lock like this
    result = run([sys.executable, "train.py", config, "--samples=False"])
    assert result.returncode == 0, result.stderr[-2000:]
    assert not lock.exists()  # released at exit


def test_resume_false_on_an_existing_run_refuses_and_keeps_its_files(corpora, tmp_path):
    config = write_config(tmp_path / "c.py", tmp_path / "run", stages=[STAGES[0]])
    assert run([sys.executable, "train.py", config, "--samples=False"]).returncode == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()}
    result = run([sys.executable, "train.py", config, "--resume=False"])
    assert result.returncode != 0 and "--resume=False would overwrite it" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir() if p.is_file()} == before


def test_a_failed_checkpoint_write_says_disk_full_and_leaves_no_tmp(tmp_path, monkeypatch):
    from infra import checkpoint
    path = str(tmp_path / "ckpt.pt")
    checkpoint.save_atomic({"step": 1}, path)

    def full_disk(obj, f):
        with open(f, "wb") as out:
            out.write(b"half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc] . PytorchStreamWriter failed writing file")
    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    with pytest.raises(SystemExit, match=r"could not write .*ckpt.pt .*Disk full"):
        checkpoint.save_atomic({"step": 2}, path)
    assert os.listdir(tmp_path) == ["ckpt.pt"]
    assert torch.load(path)["step"] == 1  # the previous checkpoint is intact


def test_ctrl_c_while_starting_ends_in_one_line_and_writes_nothing(corpora, tmp_path):
    config = write_config(tmp_path / "c.py", tmp_path / "run")
    with open(config, "a") as f:  # a config file is Python: this one takes its time to load
        f.write("import time as _time\nprint('loading', flush=True)\n_time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "train.py", config], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "loading"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    assert "interrupted while starting: nothing was trained" in err and "Traceback" not in err, err
    assert not (tmp_path / "run").exists()


def blown_up(out_dir, lr_fraction, wild_steps=3, **overrides):
    """A run whose second stage multiplies the learning rate by lr_fraction, from global step 4 on."""
    return write_config(out_dir.parent / f"{out_dir.name}.py", out_dir, **{"ckpt_interval": 100, **overrides}, stages=[
        dict(name="calm", mixture={"shakespeare": 1.0}, steps=4, seq_len=16, batch_size=2),
        dict(name="wild", mixture={"shakespeare": 1.0}, steps=wild_steps, seq_len=16, batch_size=2,
             lr_start=lr_fraction)])


def finite_loss_and_gradient(path):
    """Whether the weights saved at path give a finite loss and gradient on a batch: what makes a checkpoint good."""
    import model
    ckpt = torch.load(path, weights_only=False)
    gpt = model.GPT(model.GPTConfig(**ckpt["model_config"]), verbose=False)
    gpt.load_state_dict(ckpt["model"])
    x = torch.randint(0, 65, (2, 16))
    _, loss = gpt(x, x.roll(-1, 1))
    loss.backward()
    grads = [p.grad for p in gpt.parameters() if p.grad is not None]
    return bool(torch.isfinite(loss)) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("lr_fraction,wild_steps,stopped_by", [
    (1e27, 3, "or gradient norm (nan)"),  # the update leaves weights of about 1e24: the next gradient is NaN
    (1e42, 1, "non-finite weights or balancing biases after the update"),  # overflows to inf; the stage end saves
])
def test_a_blown_up_learning_rate_names_a_checkpoint_that_is_good(corpora, tmp_path, lr_fraction, wild_steps,
                                                                  stopped_by):
    import train
    with pytest.raises(SystemExit) as stop:
        train.main([blown_up(tmp_path / "b", lr_fraction, wild_steps)])
    message = str(stop.value.code)
    assert stopped_by in message and "stopping without saving" in message, message
    assert f"The last good checkpoint is {tmp_path / 'b' / 'ckpt.pt'} (global step 4)." in message
    ckpt = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=False)
    assert ckpt["state"]["global_step"] == 4
    assert finite_loss_and_gradient(tmp_path / "b" / "ckpt.pt") and finite_loss_and_gradient(tmp_path / "b" / "best.pt")


def test_a_checkpoint_saved_just_before_the_failing_step_is_not_called_good(corpora, tmp_path):
    import train
    with pytest.raises(SystemExit) as stop:  # (a checkpoint after every step: the one after step 5 holds ~1e24)
        train.main([blown_up(tmp_path / "b", 1e27, ckpt_interval=1)])
    message = str(stop.value.code)
    assert "global step 5;" in message and "holds the weights that gave it" in message, message
    assert "last good" not in message
    assert not finite_loss_and_gradient(tmp_path / "b" / "ckpt.pt")  # (what the message warns of)


def damage(ckpt, change):
    ckpt = {**ckpt, "model": dict(ckpt["model"]), "state": dict(ckpt["state"])}
    change(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def finished_run(corpora, tmp_path_factory):
    """The first stage of STAGES, run to its end once for the tests that damage a copy of its checkpoint."""
    folder = tmp_path_factory.mktemp("finished")
    assert run([sys.executable, "train.py", write_config(folder / "f.py", folder / "run", stages=STAGES[:1])]) \
        .returncode == 0
    return folder / "run"


@pytest.mark.parametrize("change,message", [
    (lambda c: c.pop("rng"), "not a checkpoint train.py can resume from: rng (missing)"),
    (lambda c: c.pop("train_config"), "train_config (missing)"),
    (lambda c: c.update(loader=[1]), "loader (not a dict)"),
    (lambda c: c["state"].update(step="3"), "state.step"),
    (lambda c: c.update(rng=[]), "rng (one per rank: 0 for world size 1)"),
    (lambda c: c["model"].update({"wte.weight": torch.zeros(3, 3)}), "does not fit this run's model (RuntimeError"),
    (lambda c: c["model"].pop("lm_head.weight"), "does not fit this run's model"),
    (lambda c: c.update(optimizer={"state": {}, "param_groups": []}), "does not fit this run's model (ValueError"),
])
def test_a_damaged_checkpoint_is_refused_in_one_line(finished_run, tmp_path, change, message):
    import shutil
    shutil.copytree(finished_run, tmp_path / "d")  # (out_dir may change on resume: the copy is the same run)
    config = write_config(tmp_path / "d.py", tmp_path / "d", stages=STAGES[:1])
    path = tmp_path / "d" / "ckpt.pt"
    torch.save(damage(torch.load(path, weights_only=False), change), path)
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    result = run([sys.executable, "train.py", config])
    assert result.returncode == 1 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before


def test_a_run_killed_before_its_first_checkpoint_is_still_a_run(finished_run, tmp_path):
    import shutil
    shutil.copytree(finished_run, tmp_path / "k")
    config = write_config(tmp_path / "k.py", tmp_path / "k", stages=STAGES[:1])
    os.remove(tmp_path / "k" / "ckpt.pt")  # (what a kill before the first save leaves: best.pt and metrics.jsonl)
    before = {p.name: p.read_bytes() for p in (tmp_path / "k").iterdir()}
    result = run([sys.executable, "train.py", config, "--resume=False"])
    assert result.returncode == 1 and "holds a run (best.pt, metrics.jsonl)" in result.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "k").iterdir()} == before
    result = run([sys.executable, "train.py", config])
    assert result.returncode == 0 and "stopped before its first checkpoint (best.pt, metrics.jsonl): starting it over" \
        in result.stdout
    assert len(train_records(tmp_path / "k")) == 8  # (the log starts afresh, not appended to)


def test_lines_of_metrics_jsonl_that_are_not_records_are_dropped(tmp_path):
    from infra.checkpoint import start_metrics
    from infra.plot import read_metrics
    path = tmp_path / "metrics.jsonl"
    good = [{"kind": "train", "step": 1}, {"kind": "eval", "step": 2}, {"kind": "train", "step": 3}]
    path.write_text("".join(json.dumps(r) + "\n" for r in good[:2]) + '[1, 2]\n42\n{"kind": "tra' + "\n" +
                    json.dumps(good[2]) + "\n" + '"text"\n{"step": "2"}\n')
    assert read_metrics(str(tmp_path)) == good
    start_metrics(str(path), resumed_step=2)
    assert [json.loads(line) for line in path.read_text().splitlines()] == good[:2]


def test_a_full_disk_when_the_lock_or_a_metrics_line_is_written_is_named(tmp_path, monkeypatch):
    import builtins
    import errno
    import types
    from infra import checkpoint
    real_open, real_fdopen = builtins.open, os.fdopen

    class Full:  # a file whose writes fail as on a full disk
        def __init__(self, f):
            self.f = f
        def __enter__(self):
            return self
        def __exit__(self, *exc):
            self.f.close()
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")
        writelines = write

    monkeypatch.setattr(builtins, "open", lambda path, mode="r", *a, **k: Full(real_open(path, mode, *a, **k))
                        if "a" in mode or "w" in mode else real_open(path, mode, *a, **k))
    with pytest.raises(SystemExit, match=r"could not append to .*metrics.jsonl \(No space left on device\)"):
        checkpoint.append_metrics(str(tmp_path / "metrics.jsonl"), {"kind": "train", "step": 1})
    with pytest.raises(SystemExit, match=r"could not write .*metrics.jsonl \(No space left on device\)"):
        checkpoint.start_metrics(str(tmp_path / "metrics.jsonl"), None)
    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    with pytest.raises(SystemExit, match=r"cannot write the lock .*train.lock \(No space left on device\): disk full"):
        checkpoint.claim_out_dir(types.SimpleNamespace(out_dir=str(tmp_path / "run"), resume=True))
    assert not (tmp_path / "run" / "train.lock").exists()  # (no half-written lock left to block the next run)


def test_ctrl_c_while_importing_torch_or_after_the_run_ends_is_one_line(corpora, tmp_path):
    config = write_config(tmp_path / "i.py", tmp_path / "run", stages=STAGES[:1], samples=True)
    proc = subprocess.Popen([sys.executable, "train.py", config], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    time.sleep(0.4)  # (train.py is importing torch, which takes seconds)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT and "Traceback" not in err and "Error" not in err, err
    assert "interrupted while starting: nothing was trained" in err and not (tmp_path / "run").exists()
    # A Ctrl-C while the samples print, sent from inside them: a signal sent on reading "run complete" could
    # land after the samples end (a tiny model's take a moment, and a pipe's output may come only at exit).
    ctrl_c_in_samples = ("import os, signal, sys, train\nfrom infra import evaluation\n"
                         "evaluation.show_samples = lambda *args: os.kill(os.getpid(), signal.SIGINT) or []\n"
                         "sys.exit(train.main(sys.argv[1:]))")
    proc = subprocess.run([sys.executable, "-c", ctrl_c_in_samples, config], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    out, err = proc.stdout, proc.stderr
    assert "run complete" in out and proc.returncode == 128 + signal.SIGINT and "Traceback" not in err, err
    assert err.strip().endswith("interrupted after the run ended: its checkpoint is saved")


def test_a_checkpoint_from_before_a_setting_existed_resumes_at_its_default():
    import dataclasses
    from infra import checkpoint
    from model import preset
    from train import TrainConfig
    model_cfg, train_cfg = preset("tiny_8x64"), TrainConfig()
    saved_model, saved_train = dataclasses.asdict(model_cfg), dataclasses.asdict(train_cfg)
    del saved_model["init_std"], saved_model["router"]["bias_rate"], saved_train["arith_per_level"]  # (added later)
    for stage in saved_train["stages"]:
        del stage["window"]  # (a stage's setting added later)
    ckpt = {"model_config": saved_model, "train_config": saved_train, "world_size": 1}
    assert checkpoint.same_run(ckpt, "ckpt.pt", model_cfg, train_cfg, 1) is ckpt
    changed = dataclasses.replace(model_cfg, init_std=0.125)  # a setting the old run did not use is still named
    with pytest.raises(SystemExit, match=r"init_std: checkpoint 0.02, now 0.125"):
        checkpoint.same_run(ckpt, "ckpt.pt", changed, train_cfg, 1)
    saved_model["window"] = 16  # and so is one it did use
    with pytest.raises(SystemExit, match=r"window: checkpoint 16, now 32"):
        checkpoint.same_run(ckpt, "ckpt.pt", model_cfg, train_cfg, 1)


# -----------------------------------------------------------------------------------------------------
# Hardening, third pass

def test_a_balancing_bias_that_overflows_reaches_no_checkpoint(corpora, tmp_path):
    # bias_rate 1e308 is inf in the float32 buffer: the first update makes every bias +-inf (or nan). The loss stays
    # finite (the bias only ranks experts), so only a check of the buffers finds it: the evaluation at step 1 writes
    # no best.pt, and the checkpoint after it stops the run instead of saving.
    import train
    config = write_config(tmp_path / "b.py", tmp_path / "b", stages=STAGES[:1], router={"bias_rate": 1e308},
                          ckpt_interval=1, eval_interval=1)
    with pytest.raises(SystemExit) as stop:
        train.main([config])
    assert "non-finite weights or balancing biases after the update at global step 1" in str(stop.value.code)
    assert (tmp_path / "b" / "metrics.jsonl").exists()  # (the evaluation ran, with a finite loss)
    assert not (tmp_path / "b" / "ckpt.pt").exists() and not (tmp_path / "b" / "best.pt").exists()


def test_a_run_saved_before_the_experts_module_the_bias_and_the_window_resumes_and_samples(finished_run, tmp_path):
    import re
    import shutil
    shutil.copytree(finished_run, tmp_path / "old")
    path = tmp_path / "old" / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    old = {}
    for key, value in ckpt["model"].items():  # the form an earlier version of the code wrote
        if key.endswith("expert_bias"):
            continue
        if key == "_extra_state":
            value = {"rope_base": value["rope_base"]}
        old[re.sub(r"ffn\.experts\.", "ffn.", key)] = value
    ckpt["model"] = old
    ckpt["model_config"].update(dropout=0.0)
    ckpt["model_config"]["router"].update(n_expert_groups=1, group_balance_loss=0.0)
    torch.save(ckpt, path)
    config = write_config(tmp_path / "old.py", tmp_path / "old", stages=STAGES[:1])
    resumed = run([sys.executable, "train.py", config])
    assert resumed.returncode == 0 and "resuming" in resumed.stdout and "run complete" in resumed.stdout, \
        resumed.stderr[-2000:]
    sampled = run([sys.executable, "sample.py", f"--out_dir={tmp_path / 'old'}", "--start=ROMEO:",
                   "--max_new_tokens=10"])
    assert sampled.returncode == 0 and sampled.stdout.startswith("ROMEO:"), sampled.stderr[-2000:]
    ckpt["model_config"].update(dropout=0.1)  # a setting this code no longer has, at a value it never uses
    torch.save(ckpt, path)
    refused = run([sys.executable, "sample.py", f"--out_dir={tmp_path / 'old'}"])
    assert refused.returncode == 1 and "written with dropout=0.1, a setting this code no longer has" in refused.stderr


def test_the_lock_goes_quietly_when_its_folder_cannot_be_written(tmp_path):
    from infra.checkpoint import release
    lock = tmp_path / "gone" / "train.lock"
    release(str(lock))  # (no folder at all: nothing to remove, and nothing raised)
    lock.parent.mkdir()
    lock.write_text(str(os.getpid()))
    os.chmod(lock.parent, 0o500)
    try:
        release(str(lock))  # (as root the removal still succeeds; as another user it fails quietly)
    finally:
        os.chmod(lock.parent, 0o700)


def test_ctrl_c_while_the_settings_parser_imports_is_one_line(tmp_path):
    # Deterministic: the SIGINT is sent from inside the import of infra.cli, the moment before train.py's handler.
    script = ("import os, runpy, signal, sys\n"
              "class Interrupt:\n"
              "    def find_spec(self, name, path=None, target=None):\n"
              "        if name == 'infra.cli':\n"
              "            os.kill(os.getpid(), signal.SIGINT)\n"
              "sys.meta_path.insert(0, Interrupt())\n"
              "sys.argv = ['train.py']\n"
              "runpy.run_path('train.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 130 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip() == "interrupted while starting: nothing was trained. Run the same command to start " \
                                    "again."


def test_a_signal_after_the_last_steps_check_is_not_lost(corpora, tmp_path, monkeypatch):
    import train
    real = train.Trainer.finish

    def late(self, message, complete=False):  # a SIGTERM noted after the last step's stop check
        self.stop.note(signal.SIGTERM, None)
        return real(self, message, complete)
    monkeypatch.setattr(train.Trainer, "finish", late)
    assert train.main([write_config(tmp_path / "s.py", tmp_path / "s", stages=STAGES[:1])]) == 128 + signal.SIGTERM
    assert torch.load(tmp_path / "s" / "ckpt.pt", weights_only=True)["state"]["stage"] == 1  # (its checkpoint whole)
