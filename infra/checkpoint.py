"""
Checkpoints and the run folder: what makes a killed run resumable and keeps one run from spoiling another.

    claim_out_dir     before anything is written: out_dir is a folder we can write in, no live run holds it
                      (a lock file naming the PID), and --resume=False does not overwrite a run
    save_atomic       write to .tmp, then rename: a crash leaves the old file or the new one, never half
    load_checkpoint   the checkpoint, if it continues this run; else a message naming every setting that differs
    load_run          the model and tokenizer of a run folder, for sampling and measuring (sample.py, the tools)

When a rank holds only part of the model (parallel='fsdp', or ep > 1: infra/parallel.py), every rank writes its part
with torch.distributed.checkpoint (DCP) instead, into out_dir/sharded/step_N/ beside a run.pt holding the rest
of the run state; out_dir/sharded/latest names the newest complete one:

    save_sharded      all ranks write step_N.tmp/, rank 0 renames it and then points `latest` at it (atomic)
    load_sharded      the weights and optimizer state, each rank its own part; run state as load_checkpoint's
    python -m infra.checkpoint OUT_DIR    turns the newest sharded checkpoint into OUT_DIR/ckpt.pt for sample.py

What a checkpoint holds is said once, in pack: train.py packs its checkpoints with it, consolidate packs the
one-file form of a sharded run, and load_run (sample.py, tools/experiment.py) reads any of them back into a model.
"""

import atexit
import dataclasses
import errno
import json
import os
import pickle
import re
import shutil

import torch

from data.corpus import Tokenizer
from model import GPT, GPTConfig


# Settings that change neither the math nor the evaluation: a resumed run may change these freely.
FREE_TO_CHANGE = {"out_dir", "eval_interval", "log_interval", "ckpt_interval", "resume", "plots", "samples",
                  "device", "compile"}


def pack(model_cfg, train_cfg, meta, state, **parts):
    """A checkpoint's contents: the settings (model and run), the tokenizer's meta (what rebuilds it), the run's
    state (stage, step within it, global step, tokens, best val), and the parts the checkpoint holds beside them:
    model (the weights), optimizer, loader, rng (every rank's), world_size, runtime (device, dtype, compile)."""
    as_dict = lambda c: c if isinstance(c, dict) else dataclasses.asdict(c)  # noqa: E731 (consolidate has dicts)
    return {"model_config": as_dict(model_cfg), "train_config": as_dict(train_cfg), "meta": meta,
            "state": dict(state), **parts}


def start_metrics(path, resumed_step):
    """metrics.jsonl for a fresh run (resumed_step None: empty), or for a run resumed at global step resumed_step.
    The checkpoint is the truth: keep what the stopped run logged up to it (those steps do not run again), drop a
    line cut short by a kill during a write, and start the log afresh if it is gone."""
    kept = []
    try:
        if resumed_step is not None and os.path.exists(path):
            with open(path, errors="replace") as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        continue
                    if isinstance(record, dict) and isinstance(record.get("step"), int) and \
                            record["step"] <= resumed_step:  # (a line that is not a record is dropped too)
                        kept.append(json.dumps(record) + "\n")
        with open(path, "w") as f:
            f.writelines(kept)
    except OSError as e:
        raise SystemExit(f"could not write {path} ({e.strerror}): disk full, or the folder not writable? Fix that "
                         f"and run the same command again") from None


def append_metrics(path, record):
    """One line of metrics.jsonl; a failed write (a full disk) stops the run in one line, its checkpoint intact."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise SystemExit(f"could not append to {path} ({e.strerror}): disk full, or the folder no longer writable? "
                         f"The run's checkpoint is intact: fix that and run the same command again to resume") from None


def save_atomic(obj, path, write=None):
    """Write to path.tmp, then rename: a crash leaves either the old file or the new one, never half of one.
    A failed write (a full disk, a folder gone read-only) removes the .tmp and stops with the path.
    write(obj, file path): how to write obj; torch.save unless given (a report passes a text writer)."""
    tmp = path + ".tmp"
    try:
        (write or torch.save)(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # (torch reports a short write as a RuntimeError)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"could not write {path} ({type(e).__name__}: {str(e)[:200]}). Disk full, or the folder "
                         f"no longer writable? The previous {os.path.basename(path)}, if any, is intact: free "
                         f"space and run the same command again to resume from it.")


LOCK = "train.lock"
CKPT = "ckpt.pt"  # a whole-model run's checkpoint in out_dir (a sharded run's is the folder SHARDED)


def claim_out_dir(cfg):
    """Check that out_dir can hold this run and take its lock, before anything is written: out_dir must be a
    folder we can write in, no other live run may be using it, and --resume=False must not overwrite a run.
    The lock file names our PID and goes when we exit; a lock whose PID is dead (a killed run) is stale."""
    out_dir, lock = cfg.out_dir, os.path.join(cfg.out_dir, LOCK)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"out_dir {out_dir} is a file, not a folder: choose another --out_dir")
    held = [name for name in (CKPT, SHARDED, "best.pt", "metrics.jsonl") if os.path.exists(os.path.join(out_dir, name))]
    if not cfg.resume and held:
        raise SystemExit(f"out_dir {out_dir} holds a run ({', '.join(held)}), and --resume=False would overwrite it. "
                         f"To start over, delete that folder (rm -r {out_dir}) or use another --out_dir.")
    if held and not set(held) & {CKPT, SHARDED}:
        print(f"out_dir {out_dir} holds a run stopped before its first checkpoint ({', '.join(held)}): starting it "
              f"over")
    for attempt in range(2):
        try:
            os.makedirs(out_dir, exist_ok=True)
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = lock_owner(lock)
            if pid is not None and pid != os.getpid() and pid_alive(pid):
                raise SystemExit(f"out_dir {out_dir} is in use by another run (PID {pid}; its lock is {lock}). "
                                 f"Wait for it, stop it, or use another --out_dir. (If PID {pid} is not a "
                                 f"train.py run, its lock is left from before a reboot: delete {lock}.)")
            os.remove(lock)  # stale: its run is gone
            continue
        except OSError as e:
            raise SystemExit(f"cannot write in out_dir {out_dir} ({e.strerror}): choose a folder you can write to")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
        except OSError as e:
            os.remove(lock)
            raise SystemExit(f"cannot write the lock {lock} ({e.strerror}): disk full? Free space and run the same "
                             f"command again") from None
        atexit.register(release, lock)
        return
    raise SystemExit(f"could not take the lock {lock}: another run keeps taking it")


def release(lock):
    """Remove our lock at exit; a folder gone read-only or removed meanwhile leaves it (its PID then dies)."""
    try:
        if lock_owner(lock) == os.getpid():
            os.remove(lock)
    except OSError:
        pass


def lock_owner(lock):
    try:
        with open(lock) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM  # alive, but someone else's
    return True


def load_checkpoint(path, model_cfg, train_cfg, world_size):
    """The checkpoint at path if it continues this run, else SystemExit naming every difference. Loaded with
    weights_only=True: a checkpoint from someone else's fork holds data, and cannot run code."""
    ckpt = read(path)
    if "optimizer" not in ckpt:
        raise SystemExit(f"{path} is not a resumable checkpoint written by train.py" +
                         (" (it was consolidated from a sharded checkpoint, for sample.py; the run resumes from "
                          f"{os.path.join(os.path.dirname(path), SHARDED)})" if "consolidated_from" in ckpt else ""))
    check_resumable(ckpt, path)
    return same_run(ckpt, path, model_cfg, train_cfg, world_size)


# What a checkpoint train.py resumes from holds besides its weights and optimizer state (pack's parts), and its state.
RUN_KEYS = {"model_config": dict, "train_config": dict, "meta": dict, "state": dict, "loader": dict, "rng": list,
            "world_size": int}
STATE_KEYS = {"stage": int, "step": int, "global_step": int, "tokens": int, "best_val": (float, type(None))}


def check_resumable(ckpt, path):
    """SystemExit naming what is missing or of the wrong kind, unless ckpt holds everything a run resumes from."""
    wrong = [f"{key} (missing)" if key not in ckpt else f"{key} (not a {kind.__name__})"
             for key, kind in RUN_KEYS.items() if not isinstance(ckpt.get(key), kind)]
    state = ckpt.get("state") if isinstance(ckpt.get("state"), dict) else {}
    wrong += [f"state.{key}" for key, kind in STATE_KEYS.items() if state and not isinstance(state.get(key), kind)]
    if not wrong and len(ckpt["rng"]) != ckpt["world_size"]:
        wrong.append(f"rng (one per rank: {len(ckpt['rng'])} for world size {ckpt['world_size']})")
    if wrong:
        raise SystemExit(f"{path} is not a checkpoint train.py can resume from: {', '.join(wrong)}. It is damaged, "
                         f"or from another program: move it away to start over")


def read(path):
    """A checkpoint train.py wrote (any kind: ckpt.pt, best.pt, a sharded one's run.pt), loaded as data only
    (weights_only) and brought up to this code's form (upgraded), or SystemExit saying why it is not one.
    load_checkpoint and sample.py read through here."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e)[:300]}). It is corrupt, "
                         f"not a checkpoint, or not one train.py writes: move it away to start over")
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model_config"), dict):
        raise SystemExit(f"{path} is not a checkpoint written by train.py")
    return upgraded(ckpt, path)


# A checkpoint written by an earlier version of this code: settings it has that this code no longer does, with the
# value under which the run is the same as now (None: any value), and weights it names otherwise.
REMOVED_SETTINGS = {"dropout": 0.0, "n_expert_groups": None, "group_balance_loss": 0.0}
RENAMED_WEIGHTS = [(re.compile(r"^(blocks\.\d+\.ffn\.)(w[123])$"), r"\1experts.\2")]  # (the experts' own module)


def upgraded(ckpt, path):
    """ckpt in this code's form: a removed setting dropped when it held the value this code always uses (else
    SystemExit naming it), a renamed weight under its new name, and a balancing bias the run never had at its
    starting value, zero (an MoE layer saved before the bias existed routed exactly as one whose bias is 0)."""
    settings = ckpt["model_config"]
    for where in (settings, settings.get("router") if isinstance(settings.get("router"), dict) else {}):
        for name, same in REMOVED_SETTINGS.items():
            if name in where and same is not None and where[name] != same:
                raise SystemExit(f"{path} was written with {name}={where[name]!r}, a setting this code no longer "
                                 f"has (it always uses {same!r}): train it again, or use the code that wrote it")
            where.pop(name, None)
    weights = ckpt.get("model") if isinstance(ckpt.get("model"), dict) else {}
    for old in list(weights):
        for pattern, new in RENAMED_WEIGHTS:
            if pattern.match(old):
                weights[pattern.sub(new, old)] = weights.pop(old)
    for router in [k for k in weights if k.endswith(".ffn.router.weight")]:
        weights.setdefault(router.replace("router.weight", "expert_bias"), torch.zeros(len(weights[router])))
    return ckpt


def resume(train_cfg, model_cfg, model, optimizer, world_size, rank, cuda):
    """(checkpoint, where) of the run in train_cfg.out_dir, with its weights and optimizer state loaded into model
    and optimizer and this rank's RNG restored; None when out_dir holds no checkpoint yet. A sharded checkpoint
    comes first (a run with another layout is refused there, as parallel and ep are settings it records, like the
    world size). The model's router settings and RoPE base travel inside its state dict."""
    folder, path = latest_sharded(train_cfg.out_dir), os.path.join(train_cfg.out_dir, CKPT)
    if folder is not None:
        ckpt, where = load_sharded(model, optimizer, folder, model_cfg, train_cfg, world_size), folder
    elif os.path.exists(path):
        ckpt, where = load_checkpoint(path, model_cfg, train_cfg, world_size), path
    else:
        return None
    try:  # (every part was checked for presence; what is inside may still not fit)
        if folder is None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
        rng = ckpt["rng"][rank]
        torch.set_rng_state(rng["cpu"])
        if cuda and rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"])
    except Exception as e:
        raise SystemExit(f"{where} does not fit this run's model ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
                         f". It is damaged, or from another version of the code: move it away to start over") from None
    return ckpt, where


def write_checkpoint(run, model, optimizer, out_dir, sharded, master):
    """Write the run's checkpoint (run: what pack made): every rank its part under out_dir/sharded when the model is
    sharded, else rank 0 the whole of it to out_dir/ckpt.pt."""
    if sharded:
        save_sharded(model, optimizer, run, out_dir)
    elif master:
        save_atomic({**run, "model": model.state_dict(), "optimizer": optimizer.state_dict()},
                    os.path.join(out_dir, CKPT))


def runtime_changes(then, now):
    """One line naming how a resumed run differs from the run that wrote its checkpoint in what may change on
    resume (device, precision, compilation: with dtype="auto" and compile=None these follow the device), or None.
    then and now are {"device": ..., "dtype": ..., "compile": ...}; checkpoints from before this record have none."""
    changed = [f"{k} {then[k]} -> {now[k]}" for k in now if then and k in then and then[k] != now[k]]
    if not changed:
        return None
    return (f"resuming with {', '.join(changed)}: the same run, but its numbers round differently from here on "
            f"(set device, dtype and compile to the checkpoint's to keep them)")


def last_checkpoint(out_dir, sharded):
    """The newest complete checkpoint of the run in out_dir (its sharded folder, or ckpt.pt), or None."""
    if sharded:
        return latest_sharded(out_dir)
    path = os.path.join(out_dir, CKPT)
    return path if os.path.exists(path) else None


def good_checkpoint(path, saved_at, global_step):
    """What a run that met a non-finite number at global_step says of its last checkpoint (path, or None; saved_at:
    its global step). A checkpoint is good only once a step ran from it with finite numbers: one saved just before
    the failing step holds the very weights that gave the failure, and resuming it fails again."""
    if path is None:
        return "No checkpoint was written before it."
    if saved_at == global_step:
        return (f"The last checkpoint, {path}, holds the weights that gave it (saved after the step before), so "
                f"resuming it stops here again.")
    return f"The last good checkpoint is {path} (global step {saved_at})."


def with_defaults(saved, cfg):
    """A checkpoint's settings, with each setting it lacks (one added to the code after it was written) taken at its
    default, which is what the code that wrote it did; likewise inside a nested config (the router's) and in each
    entry of a list of them (the stages)."""
    out = dict(saved)
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if f.default is not dataclasses.MISSING:
            out.setdefault(f.name, f.default)
        elif dataclasses.is_dataclass(value):
            out[f.name] = {**with_defaults({}, type(value)()), **saved.get(f.name, {})}
        elif isinstance(value, list) and value and dataclasses.is_dataclass(value[0]) and f.name in saved:
            defaults = {g.name: g.default for g in dataclasses.fields(value[0]) if g.default is not dataclasses.MISSING}
            out[f.name] = [{**defaults, **entry} if isinstance(entry, dict) else entry for entry in saved[f.name]]
    return out


def same_run(ckpt, path, model_cfg, train_cfg, world_size):
    """ckpt if its settings are this run's (but for FREE_TO_CHANGE), else SystemExit naming each difference."""
    now = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(train_cfg), "world_size": world_size}
    then = {**with_defaults(ckpt["model_config"], model_cfg), **with_defaults(ckpt["train_config"], train_cfg),
            "world_size": ckpt["world_size"]}
    differ = [f"{k}: checkpoint {then.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(now) | set(then))
              if k not in FREE_TO_CHANGE and now.get(k) != then.get(k)]
    if differ:
        raise SystemExit(f"checkpoint {path} was written by a different run:\n  " + "\n  ".join(differ) +
                         "\nResume with the settings it was written with (the same torchrun --nproc_per_node for "
                         "world_size), or use another --out_dir.")
    return ckpt


def load_run(out_dir, which="ckpt", device="cpu"):
    """(model, tokenizer) from a run directory, or SystemExit with a message that says what is wrong. The
    model routes as it last trained: its router settings travel in its state dict."""
    path = os.path.join(out_dir, f"{which}.pt")
    if os.path.isfile(out_dir):
        raise SystemExit(f"{out_dir} is a file; --out_dir names the folder train.py wrote a run into")
    if not os.path.isfile(path) and latest_sharded(out_dir) is not None:
        raise SystemExit(f"no {which}.pt in {out_dir}: that run's checkpoint is sharded over its ranks. "
                         f"python -m infra.checkpoint {out_dir} writes it to {path}")
    if not os.path.isfile(path):
        runs = sorted(d for d in os.listdir("out") if os.path.isdir(os.path.join("out", d))) \
            if os.path.isdir("out") else []
        raise SystemExit(f"no checkpoint at {path}. Run directories here: {', '.join(runs) or 'none'} "
                         f"(train one with: python train.py config/default.py)")
    ckpt = read(path)  # data only (weights_only): no code runs
    try:
        config = GPTConfig(**ckpt["model_config"])
        meta = ckpt["meta"]
    except Exception as e:
        raise SystemExit(f"cannot read {path} as a checkpoint ({type(e).__name__}: {e})")
    tokenizer = Tokenizer.from_meta(meta)
    if tokenizer.vocab_size > config.vocab_size:
        raise SystemExit(f"{path}: the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                         f"{config.vocab_size}: the checkpoint and its data do not match")
    model = GPT(config, verbose=False)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as e:
        raise SystemExit(f"{path}: the weights do not match the config stored with them:\n{e}")
    return model.to(device).eval(), tokenizer


# -----------------------------------------------------------------------------------------------------
# Sharded checkpoints (torch.distributed.checkpoint): each rank writes and reads only its own part

SHARDED = "sharded"


def latest_sharded(out_dir):
    """The folder of the newest complete sharded checkpoint in out_dir, or None."""
    latest = os.path.join(out_dir, SHARDED, "latest")
    try:
        with open(latest) as f:
            folder = os.path.join(out_dir, SHARDED, f.read().strip())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (OSError, UnicodeDecodeError) as e:
        raise SystemExit(f"cannot read {latest} ({e}): it should be a file naming the newest step_N folder beside "
                         f"it; write that name into it, or move {os.path.join(out_dir, SHARDED)} away") from None
    if not os.path.isdir(folder) or os.path.dirname(folder) != os.path.join(out_dir, SHARDED):
        raise SystemExit(f"{latest} names {os.path.basename(folder)!r}, which is not a checkpoint folder beside it: "
                         f"write the name of the newest step_N folder into it, or move "
                         f"{os.path.join(out_dir, SHARDED)} away")
    return folder


def save_sharded(model, optimizer, run, out_dir):
    """Every rank calls this. Weights and optimizer state go through DCP, each rank writing its own shards into
    step_N.tmp/; rank 0 adds run.pt (the rest of the run state), renames the folder to step_N and only then
    points `latest` at it (itself written to a .tmp and renamed), so a crash at any moment leaves `latest`
    naming a complete checkpoint. Older folders are removed after. Needs a file system every rank sees."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    root = os.path.join(out_dir, SHARDED)
    name = f"step_{run['state']['global_step']:09d}"
    tmp, final, master = os.path.join(root, name + ".tmp"), os.path.join(root, name), dist.get_rank() == 0
    try:
        if master:
            shutil.rmtree(tmp, ignore_errors=True)  # a save cut short by a crash
            os.makedirs(tmp)
        dist.barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=tmp)
        if master:
            torch.save(run, os.path.join(tmp, "run.pt"))
            if os.path.exists(final):  # an orphan of a crash between the rename and `latest`
                shutil.rmtree(final)
            os.replace(tmp, final)
            with open(os.path.join(root, "latest.tmp"), "w") as f:
                f.write(name)
            os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
            for old in os.listdir(root):
                if old.startswith("step_") and old != name:
                    shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    except (OSError, RuntimeError) as e:
        if master:
            shutil.rmtree(tmp, ignore_errors=True)
        raise SystemExit(f"could not write the sharded checkpoint {final} ({type(e).__name__}: {str(e)[:200]}). "
                         f"Disk full, or the folder not writable from every rank? The previous one, if any, is "
                         f"intact: fix that and run the same command again to resume from it.")
    dist.barrier()


# torch.distributed.checkpoint unpickles two things with plain pickle, which can run code: the folder's .metadata,
# and every non-tensor item of the shards. So the first is read here through an unpickler that admits only DCP's
# own metadata types, and each of the second must load with weights_only=True before DCP unpickles it.

METADATA_TYPES = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("pathlib", "PosixPath"),
                  ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                  ("torch.distributed.checkpoint.filesystem", "_StorageInfo")}


class MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if dtype or module == "torch.distributed.checkpoint.metadata" or (module, name) in METADATA_TYPES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it asks for {module}.{name}, which no checkpoint's metadata holds")


def check_metadata(folder):
    """SystemExit unless folder/.metadata holds only a DCP checkpoint's metadata (nothing that could run code)."""
    path = os.path.join(folder, ".metadata")
    try:
        with open(path, "rb") as f:
            MetadataUnpickler(f).load()
    except Exception as e:
        raise SystemExit(f"refusing the sharded checkpoint {folder}: its .metadata is not a checkpoint's metadata "
                         f"({type(e).__name__}: {str(e)[:200]}); it may have been made to run code. Move the folder "
                         f"away, or resume from a checkpoint you trust") from None


def data_only(planner_class):
    """planner_class whose non-tensor items must load with weights_only=True before DCP unpickles them."""
    class DataOnly(planner_class):
        def load_bytes(self, read_item, value):
            try:
                torch.load(value, weights_only=True)
            except Exception as e:
                raise ValueError(f"item {read_item.dest_index.fqn} is not data ({type(e).__name__}): refusing to "
                                 f"unpickle it") from None
            value.seek(0)
            super().load_bytes(read_item, value)
    return DataOnly


def dcp_failure(e):
    """One line for what DCP met: a CheckpointException (a BaseException) carries each failing rank's exception."""
    failures = getattr(e, "failures", None) or {None: (e, None)}
    first = next(iter(failures.values()))[0]
    return (f"{type(first).__name__}: {' '.join(str(first).split())[:240]}" +
            (f" (on rank(s) {', '.join(map(str, failures))})" if None not in failures else ""))


def load_sharded(model, optimizer, folder, model_cfg, train_cfg, world_size):
    """The run state of the sharded checkpoint in folder (SystemExit if it belongs to another run or another
    layout, or holds anything but data), after loading this rank's part of the weights and optimizer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    check_metadata(folder)
    run = read(os.path.join(folder, "run.pt"))
    check_resumable(run, os.path.join(folder, "run.pt"))
    run = same_run(run, folder, model_cfg, train_cfg, world_size)
    model_state, optimizer_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        dcp.load(state, checkpoint_id=folder, planner=data_only(dcp.DefaultLoadPlanner)())
    except (Exception, dcp.CheckpointException) as e:  # (a planted item, a truncated shard)
        raise SystemExit(f"refusing the sharded checkpoint {folder}: {dcp_failure(e)}") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return run


def consolidate(out_dir):
    """out_dir's newest sharded checkpoint as one file, out_dir/ckpt.pt, with whole tensors: what sample.py loads.
    One process, no GPU, no torchrun; it holds the whole checkpoint (weights and Adam state) in memory once."""
    from torch.distributed.checkpoint import CheckpointException, FileSystemReader
    from torch.distributed.checkpoint.format_utils import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict
    folder = latest_sharded(out_dir)
    if folder is None and os.path.isfile(out_dir):
        raise SystemExit(f"{out_dir} is a file: name the folder train.py wrote a sharded run into")
    if folder is None:
        raise SystemExit(f"no sharded checkpoint in {out_dir} (it would be {os.path.join(out_dir, SHARDED)}): "
                         f"name the out_dir of a run trained with parallel='fsdp' or ep > 1")
    check_metadata(folder)
    run = read(os.path.join(folder, "run.pt"))
    missing = [k for k in ("model_config", "train_config", "meta", "state") if not isinstance(run.get(k), dict)]
    if missing:
        raise SystemExit(f"{os.path.join(folder, 'run.pt')} lacks {', '.join(missing)}: it is damaged, or not a run "
                         f"train.py wrote; consolidate a checkpoint you trust")
    whole = {}  # (what torch's dcp_to_torch_save does, with a planner that unpickles data only)
    try:
        _load_state_dict(whole, storage_reader=FileSystemReader(folder),
                         planner=data_only(_EmptyStateDictLoadPlanner)(), no_dist=True)
    except (Exception, CheckpointException) as e:  # (a planted item, a truncated shard)
        raise SystemExit(f"refusing the sharded checkpoint {folder}: {dcp_failure(e)}") from None
    model = whole["model"]
    path = os.path.join(out_dir, CKPT)
    save_atomic(pack(run["model_config"], run["train_config"], run["meta"], run["state"], model=model,
                     consolidated_from=folder), path)
    return path


def main(argv):
    usage = ("usage: python -m infra.checkpoint OUT_DIR\n  writes OUT_DIR/ckpt.pt (whole tensors, for sample.py) from "
             "the newest sharded checkpoint of a run trained with parallel='fsdp' or ep > 1")
    from infra import cli
    out_dir = cli.one_path(argv, usage)
    if out_dir is not None:
        print(f"wrote {consolidate(out_dir)}")


if __name__ == "__main__":
    from infra import cli
    cli.run(main)
