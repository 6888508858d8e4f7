"""
Checkpoints and the run folder: what makes a killed run resumable and keeps one run from spoiling another.

    claim_out_dir     before anything is written: out_dir is a folder we can write in, no live run holds it
                      (a lock file naming the PID), and --resume=False does not overwrite a run
    save_atomic       write to .tmp, then rename: a crash leaves the old file or the new one, never half
    load_checkpoint   the checkpoint, if it continues this run; else a message naming every setting that differs

train.py calls these; it owns what goes into a checkpoint.
"""

import atexit
import dataclasses
import errno
import os

import torch


# Settings that change neither the math nor the evaluation: a resumed run may change these freely.
FREE_TO_CHANGE = {"out_dir", "eval_interval", "log_interval", "ckpt_interval", "resume", "plots", "samples",
                  "device", "compile"}


def save_atomic(obj, path):
    """Write to path.tmp, then rename: a crash leaves either the old file or the new one, never half of one.
    A failed write (a full disk, a folder gone read-only) removes the .tmp and stops with the path."""
    tmp = path + ".tmp"
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # (torch reports a short write as a RuntimeError)
        if os.path.exists(tmp):
            os.remove(tmp)
        raise SystemExit(f"could not write {path} ({type(e).__name__}: {str(e)[:200]}). Disk full, or the folder "
                         f"no longer writable? The previous {os.path.basename(path)}, if any, is intact: free "
                         f"space and run the same command again to resume from it.")


LOCK = "train.lock"


def claim_out_dir(cfg):
    """Check that out_dir can hold this run and take its lock, before anything is written: out_dir must be a
    folder we can write in, no other live run may be using it, and --resume=False must not overwrite a run.
    The lock file names our PID and goes when we exit; a lock whose PID is dead (a killed run) is stale."""
    out_dir, lock = cfg.out_dir, os.path.join(cfg.out_dir, LOCK)
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise SystemExit(f"out_dir {out_dir} is a file, not a folder: choose another --out_dir")
    if not cfg.resume and os.path.exists(os.path.join(out_dir, "ckpt.pt")):
        raise SystemExit(f"out_dir {out_dir} holds a run (ckpt.pt), and --resume=False would overwrite it. To "
                         f"start over, delete that folder (rm -r {out_dir}) or use another --out_dir.")
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
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        atexit.register(lambda: lock_owner(lock) == os.getpid() and os.remove(lock))
        return
    raise SystemExit(f"could not take the lock {lock}: another run keeps taking it")


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
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise SystemExit(f"cannot read checkpoint {path} ({type(e).__name__}: {str(e)[:300]}). It is corrupt, "
                         f"not a checkpoint, or not one train.py writes: move it away to start over")
    if not isinstance(ckpt, dict) or "optimizer" not in ckpt:
        raise SystemExit(f"{path} is not a resumable checkpoint written by train.py")
    now = {**dataclasses.asdict(model_cfg), **dataclasses.asdict(train_cfg), "world_size": world_size}
    then = {**ckpt["model_config"], **ckpt["train_config"], "world_size": ckpt["world_size"]}
    differ = [f"{k}: checkpoint {then.get(k)!r}, now {now.get(k)!r}" for k in sorted(set(now) | set(then))
              if k not in FREE_TO_CHANGE and now.get(k) != then.get(k)]
    if differ:
        raise SystemExit(f"checkpoint {path} was written by a different run:\n  " + "\n  ".join(differ) +
                         "\nResume with the settings it was written with, or use another --out_dir.")
    return ckpt
