"""
A training run's folder (train.py's out_dir): held by one run at a time, checked before the model is
built, and tidied after a run that was killed.

- The hold is an flock on out_dir/train.lock, which the operating system lets go of however the
  holder ends (kill -9 included), so it is never stuck. The file names its holder while held and
  is emptied when the holder lets go: a name found in it by the next run is a run that ended without
  letting go (killed, or crashed), which that run says as it takes over. prepare_data.py holds its
  output folder the same way (hold, with prepare.lock).
- Before the model is built: out_dir is a folder (or can be one), this process can write there, and
  the disk has room for one more checkpoint beside the last (a save writes aside, then renames).
- After a kill: temporary checkpoints of processes that are gone are removed (GBs at 1.4B), and a
  resumed run drops the log rows written after its checkpoint (they are redone), and a last row cut
  short by the kill (or by a full disk) during its writing.
- A checkpoint is written aside, flushed to disk, then renamed (save_checkpoint), so a kill or a
  full disk never leaves half a ckpt.pt; sharded.py does the same for sharded checkpoints.
"""

import contextlib
import errno
import json
import os
import shutil
import socket
import tempfile

try:
    import fcntl
except ImportError:  # not on Windows: the folder is then not guarded against a second run
    fcntl = None

LOCK = 'train.lock'
MARGIN = 1.1, 64 << 20  # room asked for beyond a checkpoint's size estimate: a share, and bytes


def claim(out_dir, checkpoint_bytes):
    """Hold out_dir for this process's run. Returns (the open lock file, what the claim made: the lock
    file and folders, for release to undo if the run never starts, a line to print or None).
    Raises ValueError, one line, when out_dir is not a folder, cannot be written, is held by a run
    still going, or lacks room for a checkpoint of checkpoint_bytes; a refused claim leaves nothing
    behind that it made."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"out_dir={out_dir} is a file, not a folder: choose another --out_dir")
    lock, made = None, ()
    try:
        lock, made, note = hold(out_dir, LOCK, '--out_dir')
        tempfile.TemporaryFile(dir=out_dir).close()  # can this process make files there?
        free = shutil.disk_usage(out_dir).free
        need = checkpoint_bytes * MARGIN[0] + MARGIN[1]
        if free < need:
            raise ValueError(f"{out_dir} has {free / 2**20:,.0f} MiB free, and a checkpoint of this run "
                             f"needs about {need / 2**20:,.0f} MiB (written beside the last one, then "
                             f"renamed): free some space or choose another --out_dir")
        return lock, made, note
    except (OSError, ValueError) as e:
        release(lock, made)  # (a lock another run holds was there before: never in made)
        if isinstance(e, OSError):
            raise ValueError(f"cannot write to {out_dir}: {e.strerror or e}") from None
        raise


def hold(folder, name, elsewhere):
    """Hold folder for this process: an flock on folder/name, made (with the folder) if missing.
    Returns (the open lock file, what was made for it: the file, then folders deepest first, for
    release to undo, a line about a holder that ended without letting go, or None). Raises ValueError,
    one line, when another process holds it (elsewhere: the setting that chooses another folder),
    OSError when the folder or the file cannot be made; then nothing it made stays."""
    lock_path = os.path.join(folder, name)
    made = ([] if os.path.exists(lock_path) else [lock_path]) + _missing_folders(folder)
    lock = None
    try:
        os.makedirs(folder, exist_ok=True)
        lock = open(lock_path, 'a+')
        return lock, made, _take(lock, folder, elsewhere)
    except ValueError:  # held: the file is the holder's now, even one this process made a moment before
        raise
    except BaseException:
        release(lock, made)
        raise


def _missing_folders(path):
    """The folders os.makedirs(path) would make, deepest first."""
    made, path = [], os.path.abspath(path)
    while not os.path.isdir(path):
        made.append(path)
        path = os.path.dirname(path)
    return made


def _take(lock, folder, elsewhere):
    """Lock the file and write this process into it; a line about a holder that never let go, or None."""
    if fcntl is not None:
        try:
            fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            lock.seek(0)
            holder = lock.read().strip() or 'a process that has not yet written its name'
            lock.close()
            raise ValueError(f"{folder} is in use by another run ({holder}): let it finish or stop it, "
                             f"or choose another {elsewhere}") from None
    lock.seek(0)
    previous = lock.read().strip()
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    lock.flush()
    if previous:
        return f"{folder}: taking over from a run that ended without letting go of it ({previous})"
    return None


def release(lock, undo=()):
    """Let go of out_dir: the lock file stays, empty (removing it could let two later runs lock two
    files), unless it is in undo, what a claim made for a run that never started."""
    if lock is not None and not lock.closed:
        lock.seek(0)
        lock.truncate()
        lock.close()
    for path in undo:  # the lock file, then the folders, deepest first: each only if it is still empty
        try:
            os.rmdir(path) if os.path.isdir(path) else os.remove(path)
        except OSError:
            break


def remove_stale_temporaries(out_dir):
    """Remove the ckpt.pt.tmp<pid> files of processes that are gone (a save killed half-way)."""
    for name in os.listdir(out_dir):
        pid = name.removeprefix('ckpt.pt.tmp')
        if pid != name and pid.isdigit() and not process_alive(int(pid)):
            os.remove(os.path.join(out_dir, name))


def process_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def trim_log(log_path, last_step):
    """Drop the log rows of steps after last_step (a resumed run redoes them), atomically, and rows
    that are not JSON objects: a kill or a full disk during an append leaves the last one cut short.
    Returns a line saying what was dropped for that, or None."""
    if not os.path.exists(log_path):
        return None
    with open(log_path, errors='replace') as f:
        lines = f.read().splitlines()
    rows, torn = [], []
    for number, line in enumerate(lines, 1):
        row = _log_row(line)
        if row is None and line.strip():
            torn.append(number)
        elif row is not None and row['iter'] <= last_step:
            rows.append(line + '\n')
    with atomic_file(log_path, 'w') as f:
        f.writelines(rows)
    if torn == [len(lines)]:
        return (f"{log_path}: dropped its last row, cut short while it was written (a kill or a full disk): "
                f"{lines[-1][:60]!r}")
    if torn:
        numbers = ', '.join(map(str, torn[:5]))
        return f"{log_path}: dropped {len(torn)} rows that are not JSON (lines {numbers})"
    return None


def _log_row(line):
    """A log line as a dict with its step ('iter', 0 if none), or None when it is not one."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or type(row.get('iter', 0)) not in (int, float):
        return None
    return {'iter': 0, **row}


@contextlib.contextmanager
def atomic_file(path, mode='wb'):
    """open(path, mode), written aside (path.tmp<pid>), flushed to disk and renamed onto path when the
    with-block completes: an interrupted or failed write leaves path as it was and no temporary file
    (after a kill -9, remove_stale_temporaries tidies it). A disk that refuses is an OSError."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(checkpoint, path):
    """torch.save, atomically (atomic_file). Raises OSError when the disk refuses (full, read-only, a
    size limit)."""
    import torch  # on use: prepare_data.py holds its folders with this module, and needs no torch
    with atomic_file(path) as f:
        try:
            torch.save(checkpoint, f)
        except RuntimeError as e:
            # torch's writer reports a failed write as its own error, the OSError behind it
            if isinstance(e.__context__, OSError):
                raise e.__context__ from None
            raise
