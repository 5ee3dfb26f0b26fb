"""Files and folders with the modes a plain open() and mkdir give under the umask.

`tempfile.mkstemp` / `mkdtemp` make 0o600 files and 0o700 folders, and safetensors'
`save_file` writes 0o600: renamed into place, such a file is unreadable to the group
that can read everything else the user writes. A leaf module (it imports nothing of
dfo_lora), so the data, model cache, export and run folders can all use it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path


def create_temp_file(parent: Path, prefix: str) -> tuple[int, str]:
    """A new file `parent/<prefix><random>`, open for writing, with the mode a plain
    open() gives (0o666 less the umask; tempfile.mkstemp would make it 0o600)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        name = Path(parent) / f"{prefix}{secrets.token_hex(6)}"
        try:
            return os.open(name, flags, 0o666), str(name)
        except FileExistsError:  # 48 random bits taken: draw again
            continue


def create_temp_dir(parent: Path, prefix: str) -> Path:
    """A new folder `parent/<prefix><random>` with the mode a plain mkdir gives (0o777
    less the umask; tempfile.mkdtemp would make it 0o700)."""
    while True:
        name = Path(parent) / f"{prefix}{secrets.token_hex(6)}"
        try:
            name.mkdir()
            return name
        except FileExistsError:
            continue


def umask() -> int:
    """The process's umask, read without changing it where /proc says it (Linux)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and put back at once
    os.umask(mask)
    return mask


def honour_umask(folder: Path) -> None:
    """Give every file under `folder` the mode a plain open() gives (0o666 less the umask)
    and every folder mkdir's (0o777 less it): safetensors' save_file and the libraries
    writing through it create files 0o600."""
    mask = umask()
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
