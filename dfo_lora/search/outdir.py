"""A run folder is owned, whole and readable: its lock, its own files, --overwrite.

- **Lock.** A run (`tune`, `tune --resume`, `baseline`) holds `<out>/.lock` for its whole
  life: the file is created with O_CREAT | O_EXCL and holds the holder's pid, host and
  start time as JSON; it is removed when the run ends, however it ends (return, error,
  Ctrl-C). A second run on the same folder stops with one line naming the holder, before
  it touches the folder. A lock left by a process that is gone (same host, its pid no
  longer running, or running as another process since) is taken over; one from another
  host cannot be checked and counts as held. The lock is re-entrant within a thread (a
  baseline that runs `tune` in its folder), and never counts as content: a folder that
  holds only a lock is empty.
- **Overwrite.** `--overwrite` removes only what dfo-lora writes in a run folder
  (`RUN_FILES`, `RUN_FOLDERS`, their temporary files) and refuses, in one line, a folder
  that holds anything else or an `--out` that is a symbolic link. The folder itself is
  never removed: it may be a mount point, or the user's.
- **Nothing left by a failed start.** A folder that the lock created is removed again
  when the run ends having written nothing into it.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from dfo_lora.errors import UserError

LOCK = ".lock"
# Everything a run writes into its folder (tune, every baseline), and the folders whose
# files are its own: `--overwrite` removes these and nothing else.
RUN_FILES = (
    "config.yaml",
    "baseline.yaml",
    "log.jsonl",
    "results.json",
    "tuned.safetensors",
    "lora.safetensors",
    "z.safetensors",
    "parameters.safetensors",
)
RUN_FOLDERS = {
    "checkpoint": ("state.safetensors",),
    "tensorboard": (),  # SummaryWriter's events.out.tfevents.* files
}
TENSORBOARD_EVENTS = "events.out.tfevents."

_held: dict[tuple[str, int], int] = {}  # (real path, thread) -> depth, for re-entrancy
_held_guard = threading.Lock()


# ---------------------------------------------------------------------- what is ours
def _temp_of(name: str, names) -> bool:
    """`.NAME.<random>` (atomic_write_bytes, save_state) or `.NAME.tmp` of a NAME we write."""
    return any(name.startswith(f".{own}.") for own in names)


def _own_file(entry: Path, names) -> bool:
    if entry.is_symlink() or not entry.is_file():
        return False
    return entry.name in names or _temp_of(entry.name, names)


def _own_folder(entry: Path) -> bool:
    """A RUN_FOLDERS folder (a real one, not a link) holding only the tool's files."""
    if entry.is_symlink() or not entry.is_dir() or entry.name not in RUN_FOLDERS:
        return False
    names = RUN_FOLDERS[entry.name]
    for item in entry.iterdir():
        if entry.name == "tensorboard":
            if item.is_symlink() or not item.is_file() or TENSORBOARD_EVENTS not in item.name:
                return False
        elif not _own_file(item, names):
            return False
    return True


def contents(out: Path) -> list[Path]:
    """What the folder holds besides the lock (none when it does not exist)."""
    if not out.is_dir():
        return []
    return sorted(p for p in out.iterdir() if p.name != LOCK)


def foreign(out: Path) -> list[Path]:
    """The entries of `out` that dfo-lora did not write (those --overwrite would not remove)."""
    return [p for p in contents(out) if not (_own_file(p, RUN_FILES) or _own_folder(p))]


def check_clearable(out: Path) -> None:
    """Raise unless `--overwrite` may empty `out`: a real folder holding only run files."""
    if out.is_symlink():
        raise UserError(
            f"out: {out} is a symbolic link (to {os.readlink(out)}); --overwrite does not "
            "delete through a link: pass the folder itself, or a new --out"
        )
    others = foreign(out)
    if others:
        more = f" and {len(others) - 1} more" if len(others) > 1 else ""
        raise UserError(
            f"out: {out} holds {others[0].name}{more}, which dfo-lora did not write; "
            "--overwrite removes only a run's own files: move it away or pick another --out"
        )


def clear(out: Path) -> None:
    """Remove a previous run's files from `out` (checked first: all of them or none);
    the folder itself and its lock stay. An empty folder (a new run's) is left as it is."""
    if not contents(out):
        return
    check_clearable(out)
    for entry in contents(out):
        if entry.is_dir():
            for item in entry.iterdir():
                item.unlink()
            entry.rmdir()
        else:
            entry.unlink()


def remove_stale_temps(out: Path) -> list[Path]:
    """Remove the temporary files of writes that a killed run left (`.NAME.<random>` of
    a run file, in the folder and its RUN_FOLDERS); call it holding the lock, so no live
    writer owns them. Returns what it removed."""
    removed = []
    for folder, names in ((out, RUN_FILES), *((out / f, n) for f, n in RUN_FOLDERS.items())):
        if folder.is_dir() and not folder.is_symlink():
            for entry in folder.iterdir():
                if _temp_of(entry.name, names) and entry.is_file() and not entry.is_symlink():
                    entry.unlink()
                    removed.append(entry)
    return removed


# ---------------------------------------------------------------------- the lock
def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) "
    return fields[19] if len(fields) > 19 else None  # field 22: starttime


def _gone(holder: dict) -> bool:
    """True when the holder is surely not running: same host, and its pid is dead, a
    zombie, or another process now. A holder on another host cannot be checked."""
    if holder.get("host") != socket.gethostname():
        return False
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        if state in ("Z", "X"):  # exited, not yet reaped: its finally clauses are done
            return True
    except (OSError, IndexError):
        pass
    started = holder.get("process_start")
    return started is not None and _process_start(pid) not in (None, started)


def _read(path: Path) -> dict | None:
    """The lock's holder; None when the file is gone; {} when it cannot be parsed."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        holder = json.loads(text)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict) -> str:
    if not holder:
        return "a run whose lock file cannot be read"
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"pid {holder.get('pid')} on {holder.get('host')}{since}"


def _in_use(out: Path, holder: dict) -> UserError:
    return UserError(
        f"out: {out} is in use by another run ({_describe(holder)}); wait for it to end, "
        f"or remove {out / LOCK} if that process is gone"
    )


def _key(out: Path) -> tuple[str, int]:
    return os.path.realpath(out), threading.get_ident()


def check_not_held(out: Path) -> None:
    """Raise when another live run holds `out` (this thread's own hold does not count);
    a stale lock passes, it is taken over when the run starts."""
    with _held_guard:
        if _key(out) in _held:
            return
    holder = _read(out / LOCK)
    if holder is not None and not _gone(holder):
        raise _in_use(out, holder)


def _acquire(out: Path) -> str:
    """Create the lock (O_EXCL), taking over a stale one; returns this hold's token."""
    path = out / LOCK
    token = secrets.token_hex(8)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "process_start": _process_start(os.getpid()),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        "token": token,
    }
    for _ in range(10):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            holder = _read(path)
            if holder is None:  # released meanwhile: try again
                continue
            if not _gone(holder):
                raise _in_use(out, holder) from None
            if _read(path) == holder:  # still the dead holder's: take it over
                path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(me) + "\n")
        return token
    raise UserError(f"out: could not take {path}: other runs keep taking it")


def _release(out: Path, token: str) -> None:
    path = out / LOCK
    holder = _read(path)
    if holder is not None and holder.get("token") == token:
        path.unlink(missing_ok=True)


def _make_folders(out: Path) -> list[Path]:
    """mkdir -p `out`; returns the folders this created, outermost first."""
    missing = []
    folder = out
    while not folder.exists() and not folder.is_symlink():
        missing.append(folder)
        if folder.parent == folder:
            break
        folder = folder.parent
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"out: {out} exists and is not a folder") from None
    except OSError as exc:
        raise UserError(f"out: cannot create {out} ({exc.strerror})") from None
    return missing[::-1]


def _remove_if_empty(created: list[Path]) -> None:
    for folder in reversed(created):
        try:
            folder.rmdir()  # only an empty folder: a run that wrote something keeps it
        except OSError:
            return


@contextmanager
def hold(out: Path) -> Iterator[Path]:
    """Own the run folder `out` (created if missing) for the block; see the module doc."""
    out = Path(out)
    key = _key(out)
    with _held_guard:
        nested = key in _held
        if nested:
            _held[key] += 1
    if nested:
        try:
            yield out
        finally:
            with _held_guard:
                _held[key] -= 1
        return
    created = _make_folders(out)
    try:
        token = _acquire(out)
    except BaseException:
        _remove_if_empty(created)
        raise
    with _held_guard:
        _held[key] = 1
    try:
        yield out
    finally:
        with _held_guard:
            del _held[key]
        _release(out, token)
        _remove_if_empty(created)
