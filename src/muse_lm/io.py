"""Crash-safe file IO for checkpoints and run directories.

Low level on purpose (stdlib only, plus `muse_lm.errors`), so both `muse_lm.models` and
`muse_lm.training` can use it without importing each other.

A run directory looks like::

    run/
      latest                 # one line: the name of the newest complete checkpoint
      step-0000100/          # model.safetensors, config.json, tokenizer.json, train_state.pt,
      step-0000200/          #   checksums.json (sha256 + size of every other file)

Every checkpoint directory is written into a hidden temp directory next to its final name and
renamed into place only once every file is written, checksummed and fsynced, so a crash or a
full disk never leaves a half-written `step-*` folder behind; `latest` is replaced with
`os.replace`. Loading verifies the checksums (`verify_checksums`).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from muse_lm.errors import CheckpointError

CHECKSUMS_FILE = "checksums.json"
LATEST_FILE = "latest"
_STEP_RE = re.compile(r"step-(\d{7,})")
_HASH_CHUNK = 1 << 20
# The two files that make a directory a checkpoint (the rest are optional for inference).
_REQUIRED_FILES = ("config.json", "model.safetensors")


def checkpoint_name(step: int) -> str:
    """`step-NNNNNNN`: zero-padded so that names sort like steps (up to 10^7 - 1; longer is fine)."""
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"checkpoint step={step!r} must be an integer >= 0")
    return f"step-{step:07d}"


def _step_of(path: Path) -> int | None:
    match = _STEP_RE.fullmatch(path.name)
    return int(match.group(1)) if match else None


def _fsync_path(path: Path) -> None:
    """fsync a file or a directory (a directory fsync makes the renames inside it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints can be many GB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _write_checksums(root: Path) -> None:
    files = {}
    for path in _files_under(root):
        rel = path.relative_to(root).as_posix()
        if rel != CHECKSUMS_FILE:
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    text = json.dumps({"format": 1, "files": files}, indent=2, sort_keys=True) + "\n"
    (root / CHECKSUMS_FILE).write_text(text, encoding="utf-8")


def _replace_directory(tmp: Path, final: Path) -> None:
    """Rename `tmp` onto `final`. An existing `final` is moved aside first and removed only
    after the new one is in place, so at every instant `final` is either absent, the old
    complete directory or the new complete one (POSIX cannot rename over a non-empty dir)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{secrets.token_hex(4)}")
        os.rename(final, old)
    try:
        os.rename(tmp, final)
    except OSError:
        if old is not None:
            os.rename(old, final)
        raise
    _fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old)


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Write a directory that appears under `final` complete or not at all.

    Yields a temp directory `.{final.name}.tmp-<random>` next to `final` (same filesystem, so
    the final rename is atomic). On normal exit it writes `checksums.json`, fsyncs every file
    and the directory, and renames it onto `final` (replacing an existing `final` safely). On
    an exception the temp directory is removed and the exception re-raised; an existing
    `final` is left untouched.

    Example:
        >>> with atomic_directory(run_dir / "step-0000100") as tmp:
        ...     (tmp / "config.json").write_text("{}")
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        _write_checksums(tmp)
        for path in _files_under(tmp):
            _fsync_path(path)
        _fsync_path(tmp)
        _replace_directory(tmp, final)
    except BaseException:
        # BaseException too: a KeyboardInterrupt mid-save must not leave the temp dir behind.
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write `text` (utf-8) to `path` through a temp file in the same directory + `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


def verify_checksums(ckpt_dir: Path) -> None:
    """Check every file listed in `ckpt_dir/checksums.json` (size, then sha256).

    Raises:
        CheckpointError: naming the first file that is missing or corrupt, or a missing or
            unreadable `checksums.json`.
    """
    ckpt_dir = Path(ckpt_dir)
    listing = ckpt_dir / CHECKSUMS_FILE
    try:
        files = json.loads(listing.read_text(encoding="utf-8"))["files"]
    except FileNotFoundError:
        raise CheckpointError(
            f"{listing} is missing: {ckpt_dir} was not written completely by muse_lm; "
            "use another checkpoint of the run (or re-save this one)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{listing} is unreadable or corrupt ({err}); use another checkpoint "
                              "of the run") from None
    for rel, expected in sorted(files.items()):
        path = ckpt_dir / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint file {path} is missing (listed in {CHECKSUMS_FILE}); "
                                  "the checkpoint is incomplete: use another checkpoint of the run")
        size = path.stat().st_size
        if size != expected["bytes"] or sha256_file(path) != expected["sha256"]:
            raise CheckpointError(
                f"checkpoint file {path} is corrupt: its size or sha256 differs from {CHECKSUMS_FILE} "
                f"({size} bytes, expected {expected['bytes']}); use another checkpoint of the run")


def update_latest(run_dir: Path, name: str) -> None:
    """Point `run_dir/latest` at checkpoint directory `name` (atomically)."""
    if _STEP_RE.fullmatch(name) is None:
        raise ValueError(f"update_latest: name={name!r} is not a checkpoint name like 'step-0000100'")
    write_text_atomic(Path(run_dir) / LATEST_FILE, name + "\n")


def _is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and all((path / f).is_file() for f in _REQUIRED_FILES)


def list_checkpoints(run_dir: Path) -> list[Path]:
    """The `step-*` directories of `run_dir`, oldest step first ([] if `run_dir` does not exist).
    Hidden temp/aside directories (`.step-*.tmp-*`) never match."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(step, p) for p in run_dir.iterdir() if p.is_dir() and (step := _step_of(p)) is not None]
    return [p for _, p in sorted(found)]


def _read_latest(run_dir: Path) -> str | None:
    path = run_dir / LATEST_FILE
    if not path.is_file():
        return None
    try:
        return path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is unreadable ({err}); delete it to fall back to the newest "
                              "step-* checkpoint") from None


def prune_checkpoints(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, never the one `latest` names.

    A doomed directory is first renamed to a hidden name, so a crash mid-delete never leaves a
    half-deleted `step-*` folder that looks like a checkpoint.
    """
    if not isinstance(keep, int) or keep < 1:
        raise ValueError(f"prune_checkpoints: keep={keep!r} must be an integer >= 1")
    run_dir = Path(run_dir)
    _remove_crash_debris(run_dir)
    latest = _read_latest(run_dir)
    for path in list_checkpoints(run_dir)[:-keep]:
        if path.name == latest:
            continue
        doomed = path.with_name(f".{path.name}.del-{secrets.token_hex(4)}")
        os.rename(path, doomed)
        shutil.rmtree(doomed)


def _remove_crash_debris(run_dir: Path) -> None:
    """Removes hidden `.step-*.{tmp,old,del}-*` directories that a crash mid-save or mid-prune left.

    Called right after a save completes: a run has one writer, so any such directory now is stale.
    """
    for path in run_dir.glob(".step-*"):
        if path.is_dir() and re.fullmatch(r"\.step-\d+\.(tmp|old|del)-\w+", path.name):
            shutil.rmtree(path, ignore_errors=True)


def _not_a_checkpoint(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a muse_lm checkpoint or run directory: expected a folder with "
        f"{' and '.join(_REQUIRED_FILES)}, or a run folder with a `latest` file or step-NNNNNNN "
        f"folders ({why}); pass the run directory written by `muse train` or one of its "
        "step-NNNNNNN folders")


def resolve_checkpoint_dir(path: str | os.PathLike) -> Path:
    """Find the checkpoint directory that `path` means.

    - a checkpoint directory (has config.json and model.safetensors) -> itself;
    - a run directory with `latest` -> the checkpoint `latest` names;
    - a run directory without `latest` -> its newest complete `step-*` checkpoint.

    Raises:
        CheckpointError: anything else (missing path, a file, an empty folder, a `latest`
            naming a checkpoint that is gone).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise _not_a_checkpoint(path, "it does not exist")
    if not path.is_dir():
        raise _not_a_checkpoint(path, "it is a file")
    if _is_checkpoint_dir(path):
        return path
    latest = _read_latest(path)
    if latest is not None:
        target = path / latest
        if _step_of(target) is None or not _is_checkpoint_dir(target):
            raise CheckpointError(
                f"{path / LATEST_FILE} names {latest!r}, which is not a complete checkpoint in {path}; "
                "pass one of its step-NNNNNNN folders explicitly, or delete `latest` to use the newest")
        return target
    for candidate in reversed(list_checkpoints(path)):
        if _is_checkpoint_dir(candidate) and (candidate / CHECKSUMS_FILE).is_file():
            return candidate
    raise _not_a_checkpoint(path, "it has no model files, no `latest` and no complete step-NNNNNNN folder")
