"""Corpus loading, content-only train/held-out split, token caching and packed batches.

Everything that decides *which* text is trained on depends only on the text itself: documents
are deduplicated and ordered by sha256, the held-out split is a function of each document's
hash, and the corpus fingerprint names the result. File names, directory order and `--seed`
never change the split or the tokenizer; the seed only orders the training windows.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tokenizers
import torch

from muse_lm.errors import DataError

BUILTIN_CORPORA = ("python-stdlib", "python-sources")
# Bump when the dedup/split rule changes: it is part of every fingerprint.
SPLIT_RULE_VERSION = "muse_lm-split-v1"
# Bump when tokenize_corpus's output for the same (corpus, tokenizer) changes.
_TOKENIZE_VERSION = "muse_lm-tokens-v1"
# Files a directory walk reads: prose and source code. A file given explicitly (or matched by a
# glob) is read whatever its extension; .jsonl files are always one document per line.
TEXT_EXTENSIONS = frozenset({
    ".txt", ".text", ".md", ".markdown", ".rst", ".tex", ".jsonl",
    ".py", ".pyi", ".c", ".h", ".cc", ".cpp", ".hpp", ".rs", ".go", ".java", ".js", ".ts", ".sh",
})
# Characters per encode_batch call. Larger calls keep both cores busy (a few huge files would
# otherwise serialize a small batch); Encoding objects cost ~100 B per token, so 8M characters
# (~2.5M tokens, ~250 MB) bounds the memory while `python-sources` (160 MB) is encoded.
_ENCODE_CHARS = 8_000_000
_SPEC_HELP = ("pass a text file, a .jsonl file (one {\"text\": ...} per line), a directory, a glob "
              "pattern, 'python-stdlib' or 'python-sources'")


@dataclass
class Corpus:
    """Deduplicated documents split into train / held-out, ordered by content hash.

    `fingerprint` (hex sha256) names the exact split: equal fingerprints mean equal documents
    in equal splits. `skipped` counts files left out because they were not UTF-8 text.
    """

    name: str
    train_docs: list[str]
    heldout_docs: list[str]
    fingerprint: str
    skipped: int = 0

    @property
    def num_docs(self) -> int:
        return len(self.train_docs) + len(self.heldout_docs)

    @property
    def num_chars(self) -> int:
        return sum(map(len, self.train_docs)) + sum(map(len, self.heldout_docs))


# ----------------------------------------------------------------------------- reading files


def _decode(path: Path) -> str | None:
    """The file's text, or None when it is binary / not UTF-8 (a NUL byte or a decode error)."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read {path} ({err.strerror}); fix its permissions or leave it out "
                        "of --data") from None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _jsonl_docs(path: Path, text: str) -> list[str]:
    docs = []
    # Split on "\n" only: JSON strings may hold raw U+2028, which str.splitlines would cut.
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{lineno}: not valid JSON ({err.msg}); each line of a .jsonl "
                            "file must be an object like {\"text\": \"...\"}") from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise DataError(f"{path}:{lineno}: line has no string field \"text\"; each line of a "
                            ".jsonl file must be an object like {\"text\": \"...\"}")
        docs.append(record["text"])
    return docs


def _file_docs(path: Path, *, explicit: bool) -> list[str] | None:
    """Documents in one file; None if it is binary (an error when the user named the file)."""
    text = _decode(path)
    if text is None:
        if explicit:
            raise DataError(f"--data {path}: not a UTF-8 text file (binary or another encoding); "
                            f"convert it to UTF-8 or {_SPEC_HELP}")
        return None
    return _jsonl_docs(path, text) if path.suffix == ".jsonl" else [text]


def _walk(top: Path, extensions: frozenset[str], skip_dirs: frozenset[str]) -> list[Path]:
    """Regular files under `top` with one of `extensions`; hidden entries, __pycache__ and
    `skip_dirs` are left out (a project folder's .git/.venv is not training data)."""
    found = []
    for root, dirs, files in os.walk(top):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and d != "__pycache__"
                         and d not in skip_dirs)
        for name in sorted(files):
            path = Path(root, name)
            if not name.startswith(".") and path.suffix in extensions and path.is_file():
                found.append(path)
    return found


def _read_many(paths: list[Path]) -> tuple[list[str], int]:
    docs, skipped = [], 0
    for path in paths:
        file_docs = _file_docs(path, explicit=False)
        if file_docs is None:
            skipped += 1
        else:
            docs.extend(file_docs)
    return docs, skipped


def _python_roots(spec: str) -> list[Path]:
    paths = sysconfig.get_paths()
    roots = [paths["stdlib"]]
    if spec == "python-sources":
        roots += [paths["purelib"], paths["platlib"]]
    unique = []
    for root in roots:
        if Path(root).is_dir() and Path(root) not in unique:
            unique.append(Path(root))
    return unique


def _read_python(spec: str) -> tuple[list[str], int]:
    paths = []
    for i, root in enumerate(_python_roots(spec)):
        # The stdlib walk skips site-packages (installed packages are not the standard library);
        # the site-packages roots of "python-sources" are walked whole.
        skip = frozenset({"site-packages", "dist-packages"}) if i == 0 else frozenset()
        paths += _walk(root, frozenset({".py"}), skip)
    return _read_many(paths)


def _read_spec(spec: str) -> tuple[list[str], int]:
    """(documents, files skipped as binary) for a path, directory or glob pattern."""
    path = Path(spec).expanduser()
    if path.is_file():
        return _file_docs(path, explicit=True), 0
    if path.is_dir():
        return _read_many(_walk(path, TEXT_EXTENSIONS, frozenset()))
    if path.exists():
        raise DataError(f"--data {spec}: not a regular file or directory; {_SPEC_HELP}")
    if not re.search(r"[*?[]", spec):
        raise DataError(f"--data {spec}: no such file or directory; {_SPEC_HELP}")
    matches = sorted(Path(m) for m in glob.glob(os.path.expanduser(spec), recursive=True))
    if not matches:
        raise DataError(f"--data {spec}: the glob pattern matched no files; check the pattern "
                        "(quote it so the shell does not expand it)")
    files = [m for m in matches if m.is_file()]
    for folder in (m for m in matches if m.is_dir()):
        files += _walk(folder, TEXT_EXTENSIONS, frozenset())
    return _read_many(files)


# ----------------------------------------------------------------------------- split


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _is_heldout(doc_hash: str, fraction: float) -> bool:
    return int(doc_hash[:8], 16) / 2**32 < fraction


def _split_one_doc(text: str, fraction: float) -> tuple[str, str]:
    """A one-document corpus: the last `fraction` of its text (cut at the line boundary nearest
    to that point, or mid-line for a single line) is held out."""
    if len(text) < 2:
        raise DataError(f"the corpus is one document of {len(text)} character(s): too little text to "
                        "split into train and held-out; use more data")
    target = round(len(text) * (1 - fraction))
    boundaries = [m.end() for m in re.finditer("\n", text) if 0 < m.end() < len(text)]
    cut = min(boundaries, key=lambda b: abs(b - target)) if boundaries else target
    cut = min(max(cut, 1), len(text) - 1)
    return text[:cut], text[cut:]


def split_documents(docs: list[str], heldout_fraction: float) -> tuple[list[str], list[str], str]:
    """Dedup (sha256 of content), drop blank documents, split by hash.

    A document is held out iff int(sha256[:8], 16) / 2**32 < heldout_fraction, so the split
    depends only on its content. Tiny corpora: if no document falls in held-out, the one with
    the smallest hash is moved there; if none is left for training, the one with the largest
    hash is moved back; a one-document corpus is cut inside its text (`_split_one_doc`).

    Returns:
        (train_docs, heldout_docs, fingerprint), each list ordered by content hash; the
        fingerprint is sha256 over the rule version, the fraction and the sorted hashes.
    """
    if not 0 < heldout_fraction < 1:
        raise ValueError(f"heldout_fraction={heldout_fraction!r} must be in (0, 1), e.g. 0.02")
    by_hash = {}
    for doc in docs:
        if doc.strip():
            by_hash.setdefault(_hash(doc), doc)
    hashes = sorted(by_hash)
    payload = "\n".join([SPLIT_RULE_VERSION, f"heldout_fraction={heldout_fraction!r}", *hashes])
    fingerprint = hashlib.sha256(payload.encode("utf-8")).hexdigest()
    if len(hashes) == 1:
        train, held = _split_one_doc(by_hash[hashes[0]], heldout_fraction)
        return [train], [held], fingerprint
    held = [h for h in hashes if _is_heldout(h, heldout_fraction)] or hashes[:1]
    if len(held) == len(hashes):
        held = held[:-1]
    held_set = set(held)
    train_docs = [by_hash[h] for h in hashes if h not in held_set]
    return train_docs, [by_hash[h] for h in held], fingerprint


def load_corpus(spec: str | None = None, *, heldout_fraction: float = 0.02) -> Corpus:
    """Load, deduplicate and split a corpus.

    Args:
        spec: None or "python-stdlib" (every .py of this interpreter's standard library, no
            site-packages), "python-sources" (that plus every .py under site-packages), or a
            path: a text file (one document), a .jsonl file (one document per line, field
            "text"), a directory (recursive: files with `TEXT_EXTENSIONS`, hidden entries and
            __pycache__ left out; binary / non-UTF-8 files skipped and counted), or a glob
            pattern (`**` recursive).
        heldout_fraction: expected share of documents held out, in (0, 1).

    Raises:
        DataError: missing path, no matches, unreadable file, malformed .jsonl, no text.
    """
    name = spec or "python-stdlib"
    if name in BUILTIN_CORPORA:
        docs, skipped = _read_python(name)
    else:
        docs, skipped = _read_spec(name)
    if not any(doc.strip() for doc in docs):
        raise DataError(f"--data {name}: found no non-empty UTF-8 text ({skipped} file(s) skipped as "
                        f"binary or not UTF-8); {_SPEC_HELP}")
    train, held, fingerprint = split_documents(docs, heldout_fraction)
    return Corpus(name=name, train_docs=train, heldout_docs=held, fingerprint=fingerprint,
                  skipped=skipped)


# ----------------------------------------------------------------------------- tokens


def cache_dir() -> Path:
    """$MUSE_CACHE_DIR, or ~/.cache/muse_lm (not created here)."""
    return Path(os.environ.get("MUSE_CACHE_DIR") or "~/.cache/muse_lm").expanduser()


@dataclass
class TokenizedCorpus:
    """Token streams: every document's ids followed by the EOS id, documents in hash order.
    1-D uint16 when the vocabulary has <= 65535 entries, else uint32."""

    train: np.ndarray
    heldout: np.ndarray


def _chunks(docs: list[str], max_chars: int) -> list[list[str]]:
    chunks, current, size = [], [], 0
    for doc in docs:
        if current and size + len(doc) > max_chars:
            chunks.append(current)
            current, size = [], 0
        current.append(doc)
        size += len(doc)
    return chunks + [current] if current else chunks


def _encode(docs: list[str], tokenizer: tokenizers.Tokenizer, dtype: type, eos: int) -> np.ndarray:
    eos_arr = np.array([eos], dtype=dtype)
    parts = []
    for chunk in _chunks(docs, _ENCODE_CHARS):
        for enc in tokenizer.encode_batch_fast(chunk, add_special_tokens=False):
            parts += [np.asarray(enc.ids, dtype=dtype), eos_arr]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_npy(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"token cache file {path} is unreadable ({err}); delete it and run again") from None


def tokenize_corpus(corpus: Corpus, tokenizer: tokenizers.Tokenizer, *, use_cache: bool = True
                    ) -> TokenizedCorpus:
    """Encode both splits into EOS-separated token streams, cached as .npy files.

    The cache key is (corpus.fingerprint, sha256 of tokenizer.to_str()), under
    cache_dir()/tokens/. A document that contains the literal text "<|endoftext|>" is encoded
    as ordinary text, so EOS ids in the stream mark document ends only.
    """
    # Imported here: muse_lm.training.tokenizer imports this module (Corpus, cache_dir).
    from muse_lm.training.tokenizer import eos_id

    eos = eos_id(tokenizer)
    dtype = np.uint16 if tokenizer.get_vocab_size() <= 65535 else np.uint32
    tok_hash = hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()
    key = hashlib.sha256(f"{_TOKENIZE_VERSION}\n{corpus.fingerprint}\n{tok_hash}".encode()).hexdigest()
    paths = [cache_dir() / "tokens" / f"{key[:32]}-{split}.npy" for split in ("train", "heldout")]
    if use_cache and all(p.is_file() for p in paths):
        return TokenizedCorpus(*(_load_npy(p) for p in paths))
    previous = tokenizer.encode_special_tokens
    tokenizer.encode_special_tokens = True
    try:
        streams = [_encode(docs, tokenizer, dtype, eos) for docs in (corpus.train_docs, corpus.heldout_docs)]
    finally:
        tokenizer.encode_special_tokens = previous
    if use_cache:
        for path, stream in zip(paths, streams):
            _save_npy_atomic(path, stream)
    return TokenizedCorpus(*streams)


# ----------------------------------------------------------------------------- batches


def _check_stream(tokens: np.ndarray) -> None:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"tokens must be a 1-D integer numpy array, got {type(tokens).__name__} "
                         f"{getattr(tokens, 'shape', '')} {getattr(tokens, 'dtype', '')}")


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    rows = tokens[starts[:, None] + np.arange(length + 1)].astype(np.int64)
    rows = torch.from_numpy(rows)
    return rows[:, :-1].contiguous(), rows[:, 1:].contiguous()


class PackedBatches:
    """Training batches of packed, non-overlapping windows, addressed by batch number.

    The stream is cut into `num_windows` windows of seq_len + 1 tokens (stride seq_len: the
    last target of a window is the first input of the next). Global row p of the run
    (p = index * batch_size + j) is window perm_e[p mod num_windows] of epoch
    e = p // num_windows, perm_e drawn from Generator(PCG64(seed + e)). `batch(index)` is a
    pure function of the constructor arguments and `index`: resuming needs only the step.

    With world_size > 1 each rank gets rows [rank*b, (rank+1)*b) of the global batch,
    b = batch_size // world_size; the ranks' rows together are the world_size=1 batch.
    """

    def __init__(self, tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int,
                 rank: int = 0, world_size: int = 1) -> None:
        _check_stream(tokens)
        for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("world_size", world_size)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PackedBatches: {name}={value!r} must be a positive integer")
        if not isinstance(seed, int) or seed < 0:
            raise ValueError(f"PackedBatches: seed={seed!r} must be an integer >= 0")
        if batch_size % world_size:
            raise ValueError(f"PackedBatches: batch_size={batch_size} is not divisible by "
                             f"world_size={world_size}; use a multiple of the number of GPUs")
        if not 0 <= rank < world_size:
            raise ValueError(f"PackedBatches: rank={rank!r} must be in [0, {world_size})")
        if len(tokens) < seq_len + 1:
            raise DataError(f"the training stream has {len(tokens)} tokens, fewer than seq_len + 1 = "
                            f"{seq_len + 1}; use a smaller --seq-len or more data")
        self.tokens, self.seq_len, self.batch_size, self.seed = tokens, seq_len, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self._perm_cache: dict[int, np.ndarray] = {}

    @property
    def num_windows(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def epoch_of(self, index: int) -> int:
        """The epoch the first row of global batch `index` belongs to."""
        return index * self.batch_size // self.num_windows

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perm_cache:
            if len(self._perm_cache) >= 4:  # a batch spans at most a few epochs; bound the memory
                self._perm_cache.pop(next(iter(self._perm_cache)))
            rng = np.random.Generator(np.random.PCG64(self.seed + epoch))
            self._perm_cache[epoch] = rng.permutation(self.num_windows)
        return self._perm_cache[epoch]

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(inputs, targets), both int64 `[batch_size // world_size, seq_len]`, targets shifted
        by one token."""
        if not isinstance(index, (int, np.integer)) or index < 0:
            raise ValueError(f"PackedBatches.batch: index={index!r} must be an integer >= 0")
        rows = self.batch_size // self.world_size
        first = int(index) * self.batch_size + self.rank * rows
        positions = np.arange(first, first + rows)
        epochs, slots = np.divmod(positions, self.num_windows)
        windows = np.array([self._perm(int(e))[s] for e, s in zip(epochs, slots)], dtype=np.int64)
        return _windows(self.tokens, windows * self.seq_len, self.seq_len)


def heldout_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, max_batches: int
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed evaluation batches: up to max_batches * batch_size windows spread evenly over the
    held-out stream (no randomness, so every evaluation sees the same tokens).

    A stream shorter than seq_len + 1 gives one row of len(tokens) - 1 tokens; the last batch
    may have fewer rows than batch_size, so average losses per target token, not per batch.

    Returns:
        list of (inputs, targets), int64 `[rows, min(seq_len, len(tokens) - 1)]`.
    """
    _check_stream(tokens)
    for name, value in (("seq_len", seq_len), ("batch_size", batch_size), ("max_batches", max_batches)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"heldout_batches: {name}={value!r} must be a positive integer")
    if len(tokens) < 2:
        raise DataError(f"the held-out stream has {len(tokens)} token(s), need at least 2 to score one "
                        "prediction; use more data or a larger held-out fraction")
    length = min(seq_len, len(tokens) - 1)
    num_windows = (len(tokens) - 1) // length
    count = min(num_windows, max_batches * batch_size)
    # floor(i * n / count) for i < count <= n: distinct, evenly spaced window numbers.
    starts = (np.arange(count, dtype=np.int64) * num_windows // count) * length
    return [_windows(tokens, starts[i:i + batch_size], length) for i in range(0, count, batch_size)]
