"""
The layouts of infra/parallel.py, each through torchrun with 2 gloo ranks on CPU: DDP, FSDP and expert parallelism
train the same two-stage run as one process with double accumulation; a killed FSDP run resumes from its
sharded checkpoint bit for bit; bad layouts stop with a message and write nothing.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from test_train import ROOT, STAGES, run, train_records
from test_train import write_config as train_config

TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
def write_config(path, out_dir, **settings):
    """test_train's run, with loss-free balancing on as well: every layout must give one process's bias too."""
    return train_config(path, out_dir, router={"bias_rate": 1e-2}, **settings)


LAYOUTS = {"ddp": [], "fsdp": ["--parallel=fsdp"], "ddp_ep2": ["--ep=2"], "fsdp_ep2": ["--parallel=fsdp", "--ep=2"]}


@pytest.fixture(scope="module")
def runs(corpora, tmp_path_factory):
    """The two-stage run of test_train (14 steps) in every layout on 2 ranks, and in one process with each
    stage's batch accumulated twice: the same sequences per step. {name: out_dir}."""
    tmp = tmp_path_factory.mktemp("layouts")
    config = write_config(tmp / "config.py", tmp / "unused")
    one_stages = [{**s, "grad_accum": 2} for s in STAGES]
    out = {"one": tmp / "one"}
    done = run([sys.executable, "train.py", write_config(tmp / "one.py", out["one"], stages=one_stages)])
    assert done.returncode == 0, done.stderr[-3000:]
    for name, flags in LAYOUTS.items():
        out[name] = tmp / name
        done = run(TORCHRUN + ["--nproc_per_node=2", "train.py", config, f"--out_dir={out[name]}", *flags])
        assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_every_layout_gives_one_process_losses(runs, layout):
    expected, got = train_records(runs["one"]), train_records(runs[layout])
    assert not (runs[layout] / "train.lock").exists()  # the ranks end with os._exit, after the exit handlers
    assert len(got) == len(expected) == 14 and {r["stage"] for r in got} == {0, 1}
    for a, b in zip(got, expected):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5), (a["step"], a["loss"], b["loss"])
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)  # (Adam alone hides a gradient's scale)
        assert a["tokens"] == b["tokens"]
    if layout.endswith("ep2"):  # the load per EP rank is logged: rows per layer per rank, adding up to the total
        for r in got:
            assert all(len(ranks) == 2 for ranks in r["ep_rows"])
            assert [sum(ranks) for ranks in r["ep_rows"]] == pytest.approx(
                [2 * sum(layer) for layer in r["tokens_per_expert"]])


def balancing_biases(out, copies):
    """{name: tensor} of every MoE layer's balancing bias in a run's checkpoint (a sharded one consolidated in a
    copy of the run, under copies)."""
    import shutil
    from infra.checkpoint import consolidate
    path = out / "ckpt.pt"
    if not path.exists():
        shutil.copytree(out, copies / out.name)
        path = consolidate(str(copies / out.name))
    return {k: v for k, v in torch.load(path, weights_only=True)["model"].items() if k.endswith("expert_bias")}


def test_every_layout_gives_one_process_balancing_bias(runs, tmp_path):
    expected = balancing_biases(runs["one"], tmp_path)
    assert len(expected) == 3 and all(v.abs().sum() > 0 for v in expected.values())  # (14 updates moved them)
    for layout in LAYOUTS:
        got = balancing_biases(runs[layout], tmp_path)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got), layout


def test_expert_parallel_layer_and_shard_sizes(corpora):
    """tests/parallel_check.py: an MoE layer split over 2 ranks gives the outputs and gradients of the whole
    layer, with uneven loads and an expert that gets no token; a model built shard by shard under FSDP + EP
    has one process's weights and leaves 1/2 of each kind per rank."""
    done = run(TORCHRUN + ["--nproc_per_node=2", "tests/parallel_check.py"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "parallel checks passed" in done.stdout


def test_consolidated_checkpoint_is_the_one_process_model_and_samples(runs):
    done = run([sys.executable, "-m", "infra.checkpoint", str(runs["fsdp_ep2"])])
    assert done.returncode == 0, done.stderr[-2000:]
    whole = torch.load(runs["fsdp_ep2"] / "ckpt.pt", weights_only=True)["model"]
    one = torch.load(runs["one"] / "ckpt.pt", weights_only=True)["model"]
    assert set(whole) == set(one)
    for k, v in one.items():
        if isinstance(v, torch.Tensor):
            assert whole[k].shape == v.shape and torch.allclose(whole[k], v, atol=1e-5), k
        else:
            assert whole[k] == v, k  # the router settings, the RoPE base and the window
    sample = run([sys.executable, "sample.py", f"--out_dir={runs['fsdp_ep2']}", "--max_new_tokens=20",
                  "--start=ROMEO:"])
    assert sample.returncode == 0 and "ROMEO:" in sample.stdout, sample.stderr[-2000:]


def test_fsdp_killed_mid_stage_resumes_bit_for_bit(runs, tmp_path):
    out = tmp_path / "killed"
    command = TORCHRUN + ["--nproc_per_node=2", "train.py", write_config(tmp_path / "c.py", out), "--parallel=fsdp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics, deadline = out / "metrics.jsonl", time.time() + 120
    while time.time() < deadline:  # after the checkpoint at step 3
        if metrics.exists() and any(json.loads(line)["step"] >= 4 for line in metrics.read_text().splitlines()):
            break
        time.sleep(0.01)
    for pid in [proc.pid] + descendants(proc.pid):  # torchrun and every rank at once, as a machine failure would
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    latest = (out / "sharded" / "latest").read_text()
    assert 3 <= int(latest.split("_")[1]) < 8, f"killed at {latest}: not mid-stage"
    resumed = run(command)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming {out / 'sharded' / latest}" in resumed.stdout
    got, expected = train_records(out), train_records(runs["fsdp"])
    assert [r["step"] for r in got] == list(range(1, 15))
    assert [r["loss"] for r in got] == [r["loss"] for r in expected]  # bitwise
    copies = tmp_path / "copies"
    resumed_bias, bias = balancing_biases(out, copies), balancing_biases(runs["fsdp"], copies)
    assert all(torch.equal(resumed_bias[k], bias[k]) for k in bias)  # the bias resumed where it stopped


def descendants(pid):
    """Every process below pid (torchrun starts its ranks in sessions of their own, out of its process group)."""
    children = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


@pytest.mark.parametrize("nproc, flags, message", [
    (1, ["--ep=3"], "ep (3) must divide n_experts (4)"),
    (1, ["--parallel=fsdp"], "parallel='fsdp' shards the model over ranks, and this is one process"),
    (1, ["--parallel=zero"], "parallel must be one of ddp, fsdp; got 'zero'"),
    (3, ["--ep=2"], "ep (2) must divide the world size (3)"),
])
def test_bad_layouts_stop_with_a_message_and_write_nothing(corpora, tmp_path, nproc, flags, message):
    out = tmp_path / "out"
    launch = [sys.executable] if nproc == 1 else TORCHRUN + [f"--nproc_per_node={nproc}"]
    done = run(launch + ["train.py", write_config(tmp_path / "c.py", out), *flags])
    assert done.returncode != 0 and message in done.stdout + done.stderr, done.stderr[-2000:]
    assert not out.exists()


class WritesAFile:  # what a planted pickle could do: here, leave a file behind
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_a_planted_pickle_in_a_sharded_checkpoint_runs_no_code(runs, tmp_path):
    import pickle
    import shutil
    out = tmp_path / "planted"
    shutil.copytree(runs["fsdp"], out)
    folder = out / "sharded" / (out / "sharded" / "latest").read_text().strip()
    marker = tmp_path / "code_ran"
    (folder / ".metadata").write_bytes(pickle.dumps(WritesAFile(marker)))
    done = run([sys.executable, "-m", "infra.checkpoint", str(out)])
    assert done.returncode == 1 and "refusing the sharded checkpoint" in done.stderr, done.stderr[-2000:]
    assert "posix.system" in done.stderr and "Traceback" not in done.stderr and not (out / "ckpt.pt").exists()
    config = write_config(tmp_path / "again.py", out)
    done = run(TORCHRUN + ["--nproc_per_node=2", "train.py", config, "--parallel=fsdp"])
    assert done.returncode != 0 and "refusing the sharded checkpoint" in done.stderr, done.stderr[-2000:]
    assert not marker.exists()


def test_a_sharded_item_that_is_not_data_is_refused_before_it_is_unpickled(tmp_path):
    import io
    import pickle
    from types import SimpleNamespace
    from torch.distributed.checkpoint import DefaultLoadPlanner
    from infra.checkpoint import data_only
    marker = tmp_path / "code_ran"
    item = SimpleNamespace(dest_index=SimpleNamespace(fqn="optimizer.param_groups"))
    with pytest.raises(ValueError, match="optimizer.param_groups is not data"):
        data_only(DefaultLoadPlanner)().load_bytes(item, io.BytesIO(pickle.dumps(WritesAFile(marker))))
    assert not marker.exists()


@pytest.mark.parametrize("nproc, flags, differ", [
    (3, ["--parallel=fsdp"], "world_size: checkpoint 2, now 3"),
    (2, [], "parallel: checkpoint 'fsdp', now 'ddp'"),
    (2, ["--parallel=fsdp", "--resume=False"], "holds a run (sharded, metrics.jsonl), and --resume=False would"),
])
def test_a_sharded_run_refuses_another_world_size_or_layout(runs, nproc, flags, differ):
    out = runs["fsdp"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    config = write_config(out.parent / "again.py", out)
    done = run(TORCHRUN + [f"--nproc_per_node={nproc}", "train.py", config, *flags])
    assert done.returncode != 0 and differ in done.stderr, done.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def truncate_a_shard(folder):
    shard = sorted(folder.glob("*.distcp"))[0]
    shard.write_bytes(shard.read_bytes()[:shard.stat().st_size // 2])


@pytest.mark.parametrize("damage,message", [
    (lambda out, folder: truncate_a_shard(folder), "refusing the sharded checkpoint"),
    (lambda out, folder: ((out / "sharded" / "latest").unlink(), (out / "sharded" / "latest").mkdir()),
     "latest ([Errno 21] Is a directory"),
    (lambda out, folder: (out / "sharded" / "latest").write_text("step_000000099"),
     "names 'step_000000099', which is not a checkpoint folder beside it"),
    (lambda out, folder: (folder / "run.pt").unlink(), "cannot read checkpoint"),
])
def test_a_damaged_sharded_checkpoint_is_refused_in_one_line_by_every_reader(runs, tmp_path, damage, message):
    import shutil
    out = tmp_path / "damaged"
    shutil.copytree(runs["fsdp"], out)
    damage(out, out / "sharded" / (out / "sharded" / "latest").read_text().strip())
    done = run([sys.executable, "-m", "infra.checkpoint", str(out)])
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    config = write_config(tmp_path / "again.py", out)
    done = run(TORCHRUN + ["--nproc_per_node=2", "train.py", config, "--parallel=fsdp"])
    ranks = done.stderr.split("Traceback (most recent call last):\n  File")[0]  # (torchrun's own report follows)
    assert done.returncode != 0 and ranks.count(message) == 2 and "Traceback" not in ranks, done.stderr[-3000:]


def test_consolidating_a_run_pt_without_its_settings_is_one_line(runs, tmp_path):
    import shutil
    out = tmp_path / "bare"
    shutil.copytree(runs["fsdp"], out)
    run_pt = out / "sharded" / (out / "sharded" / "latest").read_text().strip() / "run.pt"
    state = torch.load(run_pt, weights_only=True)
    del state["train_config"]
    torch.save(state, run_pt)
    done = run([sys.executable, "-m", "infra.checkpoint", str(out)])
    assert done.returncode == 1 and "lacks train_config" in done.stderr and "Traceback" not in done.stderr, \
        done.stderr[-2000:]
    assert not (out / "ckpt.pt").exists()
