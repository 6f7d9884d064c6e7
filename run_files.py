"""A run's own files: the rules `train_eval.py` follows for every file it writes or resumes from.

Its own module because the same three rules serve training (checkpoints), prediction (the
prediction folder, `predictions.py`) and their tests, and because each is easy to get subtly wrong:

- **Atomic writes.** `save_atomic` writes into a temporary file in the destination folder, fsyncs
  it and renames it over the old file (`os.replace`): a killed or failed write never leaves a
  partial file under the final name, and never destroys the good one there. A failure (a full
  disk, a folder that is not writable) raises `WriteError`, one line naming the file and what to do.
- **One safe read.** A checkpoint a run resumes from is read once, by `read_resume`, through
  `weights.load_untrusted` (torch's weights-only unpickler, asked for explicitly, so that no
  environment variable such as TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD can switch full unpickling on),
  checked, and handed to Lightning as that dict (`strategies.RunCheckpointIO`).
- **A run never writes into another run's files unless asked.** `claim_run_name` takes the
  checkpoint name of a training run in its `--output_dir` under an exclusive lock (`FolderLock`,
  held until the process ends): a name another run is using now, or whose checkpoints an earlier
  run left, gets a version suffix (`-v1`, `-v2`, ...), unless the run continues that name
  (`--resume` of one of its checkpoints) or `--overwrite` replaces it. `predictions.claim_folder`
  does the same for a prediction folder.

Only global rank 0 writes (Lightning saves checkpoints there), so only it claims names and folders
(`is_global_rank_zero`, read from the launchers' variables before Lightning starts).
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import json
import logging
import os
import re
import shutil
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

try:
    import fcntl
except ImportError:                      # Windows: no advisory locks; names are still checked
    fcntl = None

log = logging.getLogger(__name__)


class RunFileError(RuntimeError):
    """A run's file that cannot be used or written: a one-line message naming it."""


class WriteError(RunFileError):
    """A write that failed; the file under the final name (if any) is unchanged."""


# ----------------------------------------------------------------------------------------------
# Atomic writes
# ----------------------------------------------------------------------------------------------

class _Writer:
    """The temporary file's writer; keeps the `OSError` of a failed write (torch's zip writer turns
    it into a RuntimeError, which would hide a full disk)."""

    def __init__(self, file):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.file.flush()


def write_failure(path: Path, error: OSError) -> str:
    """One line: which file could not be written, why, and what to do."""
    why = error.strerror or str(error)
    if error.errno == errno.ENOSPC:
        todo = "the disk is full: free space on it (or write elsewhere), then run again"
    elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        todo = f"the folder {str(path.parent)!r} is not writable: choose a writable one"
    else:
        todo = "check the folder and the disk, then run again"
    return f"could not write {path}: {why}; {todo}. The previous {path.name} (if any) is unchanged"


def save_atomic(obj: Any, path: str | os.PathLike, save: Callable[[Any, Any], None] = torch.save) -> Path:
    """Write `obj` to `path` with `save(obj, file)` (default `torch.save`) atomically: a temporary
    file in the same folder, fsync, rename over `path`. On failure the temporary file is removed,
    `path` is untouched and `WriteError` says why (an `OSError` of the write, e.g. ENOSPC)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    except OSError as e:
        raise WriteError(write_failure(path, e)) from None
    writer = None
    try:
        with os.fdopen(fd, "wb") as f:
            writer = _Writer(f)
            save(obj, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        error = e if isinstance(e, OSError) else (writer.error if writer is not None else None)
        if error is not None:
            raise WriteError(write_failure(path, error)) from None
        raise
    with contextlib.suppress(OSError):        # the rename itself survives a power cut
        folder = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    return path


def save_json_atomic(data: Any, path: str | os.PathLike) -> Path:
    """`data` as indented JSON, written atomically (`save_atomic`)."""
    return save_atomic(data, path, lambda obj, f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


# ----------------------------------------------------------------------------------------------
# Locks, and who writes
# ----------------------------------------------------------------------------------------------

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID")


def is_global_rank_zero() -> bool:
    """Whether this process is global rank 0 of its run, before Lightning starts: every rank
    variable the launchers set (torchrun, SLURM, Lightning's own launch of the other processes) is
    0 or unset. The process a user starts is rank 0."""
    return all(os.environ.get(name, "0").strip() in ("", "0") for name in RANK_VARIABLES)


class FolderLock:
    """An exclusive lock on a file (`flock`), held while this object is open: the kernel drops it
    when the process ends, however it ends, so a crashed run never leaves a stale lock. The file
    stays (a hidden `.<name>.lock`) and records who holds it."""

    def __init__(self, path: Path):
        self.path, self._file = Path(path), None

    def acquire(self) -> bool:
        """Take the lock (creating the file); False when another process holds it. OSError when the
        folder cannot be written."""
        f = open(self.path, "a+")
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.close()
                return False
        f.seek(0)
        f.truncate()
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                   "command": sys.argv}, f)
        f.flush()
        self._file = f
        return True

    def holder(self) -> str:
        """Who holds the lock, as its file records it."""
        try:
            record = json.loads(self.path.read_text())
            return f"pid {record['pid']} on {record['host']}, started {record['started']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "another process"

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


# ----------------------------------------------------------------------------------------------
# A training run's checkpoint names
# ----------------------------------------------------------------------------------------------

_FIELD = re.compile(r"\{[^}]*\}")
_NUMBER = r"(?:[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|[-+]?inf|nan)"


def last_name(model_save_name: str) -> str:
    """Name of the rolling "last" checkpoint of a run: `stage1_cc3m_{epoch}-{step}` -> `stage1_cc3m-last`
    (one per run name, so stage 1 and stage 2 in one folder do not overwrite each other)."""
    return re.sub(r"[_-]?\{[^}]*\}", "", model_save_name) + "-last"


class RunName:
    """The checkpoint files of one run name (`--model_save_name`) in one folder (`--output_dir`):
    `<name>` with Lightning's `{...}` fields filled (the best ones), `<base>-last.ckpt`,
    `<base>-step<N>.ckpt`, where base is the name without its fields; and the lock `.<base>.lock`."""

    def __init__(self, out_dir: Path, model_save_name: str):
        self.out_dir, self.model_save_name = Path(out_dir), model_save_name
        self.base = last_name(model_save_name)[: -len("-last")]
        name = Path(self.base).name or "run"
        self.lock = FolderLock((self.out_dir / (self.base or "run")).with_name(f".{name}.lock"))

    @property
    def last_path(self) -> Path:
        return self.out_dir / f"{self.base}-last.ckpt"

    @property
    def metrics_path(self) -> Path:
        """`<base>-metrics.json`: what the run ended with (steps, metrics, its best and last
        checkpoints), for programs that start train_eval.py and read its outcome."""
        return self.out_dir / f"{self.base}-metrics.json"

    @property
    def step_name(self) -> str:
        """`--save_every_n_steps`'s file name pattern."""
        return self.base + "-step{step}"

    def _is_mine(self, stem: str) -> bool:
        base = Path(self.base).name
        if stem == f"{base}-last" or re.fullmatch(re.escape(base) + r"-step\d+", stem):
            return True
        # Lightning fills the fields with numbers (epoch, step, metrics: auto_insert_metric_name=False),
        # so `x_{epoch}-{step}` is `x_0-4`, not `x_other-last` (another run's -last).
        parts = _FIELD.split(Path(self.model_save_name).name)
        return bool(re.fullmatch(_NUMBER.join(re.escape(p) for p in parts), stem))

    def files(self) -> list[Path]:
        """This name's checkpoints in its folder (files, or DeepSpeed's folders), sorted."""
        folder = self.lock.path.parent
        if not folder.is_dir():
            return []
        return sorted(p for p in folder.iterdir() if p.suffix == ".ckpt" and self._is_mine(p.name[: -len(".ckpt")]))

    def owns(self, path: Path) -> bool:
        """Whether `path` is one of this name's checkpoints (a run resumed from it continues the name)."""
        path = Path(path)
        return (path.suffix == ".ckpt" and path.parent.resolve() == self.lock.path.parent.resolve()
                and self._is_mine(path.name[: -len(".ckpt")]))

    def release(self) -> None:
        self.lock.release()


def claim_run_name(out_dir: Path, model_save_name: str, what: str, resume: Path | None = None,
                   overwrite: bool = False) -> RunName:
    """Take a checkpoint name in `out_dir` for this run (global rank 0; the lock is held until the
    run ends or `release`). `what` names the folder for messages (`--output_dir` or WEIGHTFOLDER).

    - `resume` is one of the name's own checkpoints: the run continues that name.
    - the name is free (no checkpoint of it, no run using it now): taken as it is.
    - otherwise, with `overwrite`, the earlier run's checkpoints of the name are deleted and the
      name taken; without it, the first free `<name>-vN`. Either is said on stdout.
    A run that holds the name now is never overwritten: continuing or overwriting it is an error.
    A folder that cannot be created or written is an error, before anything is loaded."""
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        wanted = RunName(out_dir, model_save_name)
        wanted.lock.path.parent.mkdir(parents=True, exist_ok=True)
        continuing = resume is not None and wanted.owns(resume)
        if continuing or overwrite:
            if not wanted.lock.acquire():
                how = "--resume" if continuing else "--overwrite"
                raise RunFileError(
                    f"another run ({wanted.lock.holder()}) is writing the checkpoints {model_save_name!r} in "
                    f"{str(out_dir)!r} now; {how} does not take them from a running run: wait for it, or give "
                    f"another --model_save_name")
            old = [] if continuing else wanted.files()
            if old:
                for path in old:
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
                print(f"--overwrite: deleted the {len(old)} checkpoint(s) an earlier run wrote as "
                      f"{model_save_name!r} in {out_dir}: {', '.join(p.name for p in old)}")
            return wanted
        for version in itertools.count():
            name = model_save_name if version == 0 else f"{model_save_name}-v{version}"
            candidate = RunName(out_dir, name)
            if not candidate.lock.acquire():
                continue
            if candidate.files():
                candidate.release()
                continue
            if version:
                print(f"checkpoint name {model_save_name!r} is taken in {out_dir} (another run's checkpoints, or a "
                      f"run writing them now): this run writes as {name!r} (--overwrite replaces the earlier run's "
                      f"instead); to resume this run later: --model_save_name '{name}' --resume last")
            return candidate
    except OSError as e:
        raise RunFileError(f"{what} {str(out_dir)!r} cannot be written: {e.strerror or e}; give a writable folder "
                           f"(nothing was loaded)") from None
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------
# Reading the checkpoint to resume from
# ----------------------------------------------------------------------------------------------

RESUME_KEYS = ("state_dict", "optimizer_states", "lr_schedulers", "loops", "global_step")


def read_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint through the project's one loading rule (`weights.load_untrusted`)."""
    from weights import CheckpointError, load_untrusted

    try:
        checkpoint = load_untrusted(path, "training checkpoint")
    except (CheckpointError, FileNotFoundError) as e:
        raise RunFileError(str(e)) from None
    if not isinstance(checkpoint, dict):
        raise RunFileError(f"{path}: not a training checkpoint (a {type(checkpoint).__name__}, not a dict)")
    return checkpoint


def read_resume(path: Path) -> dict:
    """The checkpoint `--resume` names, read once (`read_checkpoint`) and checked to be resumable:
    Lightning's training state is there, not only weights."""
    checkpoint = read_checkpoint(path)
    missing = [key for key in RESUME_KEYS if key not in checkpoint]
    if missing:
        raise RunFileError(
            f"{path}: not a checkpoint training can resume from (it has no {', '.join(missing)}: it holds weights "
            f"only, e.g. a released checkpoint); to start from its weights give it to --stage1_weight instead")
    return checkpoint


def check_deepspeed_folder(folder: Path) -> dict:
    """DeepSpeed's checkpoint folder: every `.pt` in it must load under the weights-only rule (DeepSpeed
    reads them itself); returns `checkpoint/mp_rank_00_model_states.pt` (state_dict, settings).
    Written from DeepSpeed's layout; not run in our tests (no GPU in CI)."""
    from weights import CHECKPOINT_GLOBALS

    for path in sorted(folder.rglob("*.pt")):
        try:
            with torch.serialization.safe_globals(CHECKPOINT_GLOBALS):
                unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        except (RuntimeError, ValueError, OSError) as e:
            raise RunFileError(f"{path}: not a readable checkpoint file: {e}") from None
        if unsafe:
            raise RunFileError(f"refused to load {path}: it needs {', '.join(sorted(unsafe))}, which no checkpoint "
                               f"contains (unpickling it could run code from the file); nothing from it was used")
    states = folder / "checkpoint" / "mp_rank_00_model_states.pt"
    if not states.is_file():
        raise RunFileError(f"{folder}: not a DeepSpeed checkpoint of this project (no {states.relative_to(folder)})")
    return read_checkpoint(states)
