"""The output folder of a run: one run at a time, no stale leftovers, files replaced whole.

A run owns its folder (--out, `out_dir`) for as long as it writes there: the writing process
(rank 0) takes an exclusive lock, `fcntl.flock`, on `<folder>/.lock` and writes its PID into
it. A second run on the same folder fails at once with an error that names the holder, instead
of deleting the first run's checkpoints or interleaving lines in its metrics.jsonl. The kernel
drops the lock when its process dies, however it dies, so a killed run never leaves its folder
locked.

Files that must never be seen half-written (a checkpoint, metrics.jsonl when a resume rewrites
it, summary.json) are written under a name that starts with `.tmp_`, fsynced and renamed into
place. A kill can leave only such temporaries behind; the next run removes them under the
lock, where no live run can own them.
"""
import contextlib
import os
import shutil
import signal

try:
    import fcntl
except ImportError:  # Windows has no flock: folders are not locked there
    fcntl = None

LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp_"
FAULT_ENV = "REFERENCE_FAULT"


class OutDirInUse(RuntimeError):
    """Another live run holds the output folder."""


_held = {}  # real path of a folder -> [its open lock file, how many holds this process has]


def lock_out_dir(out_dir):
    """Take `out_dir` for this process until `unlock_out_dir` (or until the process ends).

    Re-entrant within one process: the chapter runner and the Trainer both take the folder.
    Raises OutDirInUse, naming the folder and the holder's PID, when another process has it."""
    os.makedirs(out_dir, exist_ok=True)
    key = os.path.realpath(out_dir)
    if key in _held:
        _held[key][1] += 1
        return
    path = os.path.join(out_dir, LOCK_FILE)
    f = open(path, "a+")  # "a+": opening must not erase the holder's PID before we know we lock
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "unknown (it has not written it yet)"
            f.close()
            raise OutDirInUse(
                f"{out_dir} is in use by another run (PID {holder}, which holds {path}). Two runs "
                "in one folder would delete each other's checkpoints and interleave metrics.jsonl: "
                "wait for that run to finish or stop it, or give this run another --out "
                "(out_dir).") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    _held[key] = [f, 1]


def unlock_out_dir(out_dir):
    """Give up one hold of `out_dir`; the lock goes when this process's last hold does."""
    key = os.path.realpath(out_dir)
    if key not in _held:
        return
    _held[key][1] -= 1
    if _held[key][1] == 0:
        f = _held.pop(key)[0]
        f.truncate(0)  # no stale PID for the next run's error message to name
        f.close()  # closing the file releases the flock


def unlock_under(root):
    """Give up every hold this process has on `root` and the folders inside it (a chapter's
    phases), whoever took them: the end of a run, or of one that failed."""
    top = os.path.realpath(root)
    for key in [k for k in _held if k == top or k.startswith(top + os.sep)]:
        _held[key][1] = 1
        unlock_out_dir(key)


@contextlib.contextmanager
def locked(*folders):
    """Hold each of `folders` (None ones skipped) for the body of a `with`, released on any exit."""
    taken = []
    try:
        for folder in folders:
            if folder is not None:
                lock_out_dir(folder)
                taken.append(folder)
        yield
    finally:
        for folder in reversed(taken):
            unlock_out_dir(folder)


def remove_stale_temporaries(*folders):
    """Remove the `.tmp_*` files and folders that killed runs left in `folders` (a checkpoint
    being written, metrics.jsonl being rewritten). Call it holding the folders' locks: then no
    live run can be writing them. Returns the paths removed."""
    removed = []
    for folder in folders:
        if folder is None or not os.path.isdir(folder):
            continue
        for name in sorted(os.listdir(folder)):
            if name.startswith(TMP_PREFIX):
                path = os.path.join(folder, name)
                if os.path.isdir(path) and not os.path.islink(path):
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(path)
                removed.append(path)
    if removed:
        print(f"removed what an interrupted run left half-written: {', '.join(removed)}")
    return removed


def remove_tree(path):
    """Delete a folder so that a kill part-way leaves nothing that looks like it: it is renamed
    to a `.tmp_` name first (an atomic step), then deleted."""
    doomed = os.path.join(os.path.dirname(path) or ".",
                          f"{TMP_PREFIX}removed_{os.path.basename(path)}_{os.getpid()}")
    shutil.rmtree(doomed, ignore_errors=True)
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def fsync_dir(path):
    """Make a rename inside `path` durable (a no-op where directories cannot be fsynced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path, data, fault=None):
    """Replace `path` with `data` (bytes or str) whole: a kill leaves the old file or the new
    one, never part of either. `fault` names this write's crash-test point (`fault_point`)."""
    folder = os.path.dirname(path) or "."
    tmp = os.path.join(folder, TMP_PREFIX + os.path.basename(path))
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if fault:
            fault_point(fault)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


_fault_hits = {}


def fault_point(name):
    """A crash-test hook, and nothing else. With REFERENCE_FAULT=NAME:N in the environment, the
    process SIGKILLs itself the N-th time it reaches the point NAME (tests/scripts/
    kill_and_resume.py uses it to kill a run inside a save or right after a resume starts).
    Unset, as in every real run, it does nothing."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    point, _, count = spec.partition(":")
    if point != name:
        return
    _fault_hits[name] = _fault_hits.get(name, 0) + 1
    if _fault_hits[name] == int(count or 1):
        os.kill(os.getpid(), getattr(signal, "SIGKILL", signal.SIGTERM))
