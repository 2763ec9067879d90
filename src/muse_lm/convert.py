"""`muse convert`: a trained dense embedding -> HTT cores by TT-SVD, optionally after reordering ids.

Row order matters to a tensor train: with K = 2, row i = (i_1, i_2) is G_1[i_1] G_2[i_2], so the
v_2 rows that share a leading digit share the left factor G_1[i_1]. Putting the rows that carry
most of the table's energy into the same few leading-digit blocks lets the truncated TT-SVD spend
its rank on them. `convert_embedding` tries such orders and keeps the one with the lowest error;
the module then serves the original ids through `HTTEmbedding.set_id_permutation`.

The output is a safetensors file holding the module's state dict (`cores.0..K-1`, plus `id_map`
when the ids were reordered: id_map[token id] = TT row) with the conversion report as JSON in its
metadata and in a `.json` sidecar; `load_converted` rebuilds the module from it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from muse_lm.errors import CheckpointError, ConfigError, DataError
from muse_lm.io import write_text_atomic
from muse_lm.layers.htt import HTTEmbedding

log = logging.getLogger("muse_lm")

REORDERS = ("auto", "none", "frequency", "norm")
# Exact names first (GPT-2, Llama/Mistral, BERT-like, GPT-NeoX, T5, muse's dense table), then
# the same names as suffixes, so `transformer.wte.weight` or `model.model.embed_tokens.weight` match.
EMBEDDING_KEYS = ("wte.weight", "transformer.wte.weight", "model.embed_tokens.weight", "embed_tokens.weight",
                  "embedding.weight", "embeddings.word_embeddings.weight", "word_embeddings.weight",
                  "gpt_neox.embed_in.weight", "embed_in.weight", "tok_embeddings.weight", "shared.weight",
                  "token_embedding.weight", "embed.weight")
# Under reorder="auto" a reorder is kept only if it lowers the error by at least this fraction and
# this much in absolute terms: it costs a V-entry id map and one gather per lookup, which a
# rounding-level gain (e.g. 1e-15 vs 2e-15 on an exactly-TT table) does not pay for.
_MIN_REORDER_GAIN = 0.01
_MIN_REORDER_GAIN_ABS = 1e-6
_META_KEY = "muse_convert"


@dataclass
class ConversionResult:
    """What `convert_embedding` did.

    module: the HTT embedding (served in original ids when permuted). permutation: `[V]` int64,
    new id -> old id (TT row j holds token permutation[j]), or None. error: relative Frobenius
    error of the kept order; error_without_reorder: the same in the original order. errors: every
    order tried -> its error. notes: orders skipped and why.
    """

    module: HTTEmbedding
    permutation: Tensor | None
    params_before: int
    params_after: int
    error: float
    error_without_reorder: float
    reorder: str = "none"
    errors: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def compression(self) -> float:
        return self.params_before / self.params_after


def reorder_permutation(weight: Tensor, method: str, token_counts: Tensor | None = None) -> Tensor:
    """The id order `method` asks for: `[V]` int64, new id -> old id.

    "norm": rows by descending L2 norm (trained tables have Zipf-like row norms; grouping the
    heavy rows into the first leading-digit blocks lets them share core slices). "frequency":
    ids by descending `token_counts` (frequent tokens are the heavy, well-trained rows).
    Ties keep the original order, so the result is deterministic.
    """
    if method == "norm":
        key = torch.linalg.vector_norm(weight.detach().to(torch.float64), dim=1)
    elif method == "frequency":
        if token_counts is None:
            raise ValueError("reorder_permutation: 'frequency' needs token_counts")
        key = token_counts.to(torch.float64)
    else:
        raise ValueError(f"reorder_permutation: method={method!r}; use 'norm' or 'frequency'")
    return torch.argsort(key.cpu(), descending=True, stable=True)


def _pays(old_error: float, new_error: float) -> bool:
    return new_error < old_error * (1 - _MIN_REORDER_GAIN) and old_error - new_error > _MIN_REORDER_GAIN_ABS


def _pick(reorder: str, errors: dict[str, float]) -> str:
    """The order to keep: the one asked for, or under "auto" the lowest-error reorder if it pays."""
    if reorder != "auto":
        return reorder if reorder in errors else "none"
    best = min((n for n in errors if n != "none"), key=errors.__getitem__, default="none")
    return best if best != "none" and _pays(errors["none"], errors[best]) else "none"


def _check_inputs(weight: Tensor, rank: int, num_cores: int, reorder: str, token_counts: Tensor | None) -> None:
    if not isinstance(weight, Tensor) or weight.ndim != 2 or min(weight.shape) < 1:
        shape = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise DataError(f"the embedding must be a non-empty [vocab, d_model] tensor, got {shape}; "
                        "pass the token embedding table (see --key)")
    if not weight.dtype.is_floating_point:
        raise DataError(f"the embedding has dtype {weight.dtype}; a token table must be floating point (see --key)")
    if not torch.isfinite(weight).all():
        raise DataError("the embedding holds NaN or inf values; TT-SVD needs a finite table: convert a healthy "
                        "checkpoint")
    if not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"rank={rank!r} is invalid: the TT rank must be an integer >= 1 (e.g. --rank 16)")
    if num_cores not in (2, 3):
        raise ConfigError(f"num_cores={num_cores!r} is not supported: HTT has 2 or 3 cores")
    if reorder not in REORDERS:
        raise ConfigError(f"reorder={reorder!r} is unknown; use one of {', '.join(REORDERS)}")
    if token_counts is not None and tuple(token_counts.shape) != (weight.shape[0],):
        raise DataError(f"token_counts has shape {tuple(token_counts.shape)} but the table has {weight.shape[0]} "
                        "rows; give one count per token id")


def convert_embedding(weight: Tensor, *, rank: int, num_cores: int = 2,
                      vocab_factors: tuple[int, ...] | None = None, dim_factors: tuple[int, ...] | None = None,
                      reorder: str = "auto", token_counts: Tensor | None = None) -> ConversionResult:
    """TT-SVD of a dense table `weight` `[V, D]` into an `HTTEmbedding`, trying id orders.

    Args:
        weight: `[V, D]` float table. fp16/bf16 are converted in fp32 (the cores are tiny, so
            there is no reason to round them).
        rank: the largest inner TT rank (capped where an unfolding allows less).
        num_cores: K in {2, 3}. vocab_factors / dim_factors: as in `HTTEmbedding`.
        reorder: "none" keeps the ids; "norm" / "frequency" factorize in that order
            (`reorder_permutation`); "auto" tries every order available and keeps the lowest
            error, unless it beats the original order by less than 1% relative.
        token_counts: `[V]` counts for "frequency"; without them that order is skipped (noted).

    Returns:
        A `ConversionResult`; `result.module.dense_weight()` approximates `weight` row by row in
        the original ids, with relative Frobenius error `result.error`.

    Example:
        >>> res = convert_embedding(torch.randn(1000, 64), rank=8)
        >>> res.module(torch.tensor([3, 999])).shape
        torch.Size([2, 64])
    """
    _check_inputs(weight, rank, num_cores, reorder, token_counts)
    if weight.dtype in (torch.float16, torch.bfloat16):
        weight = weight.float()
    order_names = {"auto": ["norm", "frequency"], "none": []}.get(reorder, [reorder])
    notes, errors, tried = [], {}, {}
    for name in ["none", *order_names]:
        if name == "frequency" and token_counts is None:
            notes.append("frequency order skipped: no token counts (token_counts / --counts)")
            continue
        perm = None if name == "none" else reorder_permutation(weight, name, token_counts)
        table = weight if perm is None else weight[perm.to(weight.device)]
        tried[name] = (perm, HTTEmbedding.from_embedding(table, rank, num_cores, vocab_factors=vocab_factors,
                                                          dim_factors=dim_factors))
        errors[name] = tried[name][1].conversion_error
        log.info("muse convert: order %-9s relative error %.6f", name, errors[name])
    name = _pick(reorder, errors)
    perm, emb = tried[name]
    if perm is not None:
        emb.set_id_permutation(perm)
    return ConversionResult(module=emb, permutation=perm, params_before=weight.numel(),
                            params_after=emb.num_parameters(), error=errors[name],
                            error_without_reorder=errors["none"], reorder=name, errors=errors, notes=notes)


# ---- reading sources ---------------------------------------------------------------------------
def find_embedding_key(keys: list[str], shapes: dict[str, tuple[int, ...]], key: str | None, source: Path) -> str:
    """The embedding's name among a state dict's `keys`: `key` if given, else a known name."""
    if key is not None:
        if key not in shapes:
            raise DataError(f"{source} has no tensor named {key!r}; it has {_some_keys(shapes)}; pass one of "
                            "those to --key")
        return key
    for name in EMBEDDING_KEYS:
        if name in shapes and len(shapes[name]) == 2:
            return name
    found = sorted({k for k in keys for s in EMBEDDING_KEYS if k.endswith("." + s) and len(shapes[k]) == 2})
    if len(found) == 1:
        return found[0]
    if found:
        raise DataError(f"{source} has several embedding-like tensors ({', '.join(found)}); pick one with --key")
    raise DataError(f"{source} has no tensor with a known embedding name (wte.weight, embed_tokens.weight, ...); "
                    f"it has {_some_keys(shapes)}; name the [vocab, d_model] table with --key")


def _some_keys(shapes: dict[str, tuple[int, ...]]) -> str:
    two_d = [f"{k} {list(s)}" for k, s in shapes.items() if len(s) == 2]
    if not two_d:
        return f"no 2-d tensor among {len(shapes)}"
    more = f" and {len(two_d) - 8} more" if len(two_d) > 8 else ""
    return "2-d tensors " + ", ".join(two_d[:8]) + more


def _read_safetensors(path: Path, key: str | None) -> tuple[str, Tensor]:
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            name = find_embedding_key(keys, shapes, key, path)
            return name, f.get_tensor(name)
    except (safetensors.SafetensorError, OSError) as err:
        raise CheckpointError(f"{path} is not a readable safetensors file ({err}); pass a .safetensors file or "
                              "a muse run/checkpoint directory") from None


@dataclass
class Source:
    """An embedding table read for conversion, with what is known about its token frequencies."""

    path: Path
    key: str
    weight: Tensor
    token_counts: Tensor | None = None
    notes: list[str] = field(default_factory=list)
    default_out: Path | None = None


def read_source(path: str | os.PathLike, key: str | None = None, *, want_counts: bool = True) -> Source:
    """A safetensors file or a muse run/checkpoint directory -> its dense embedding table.

    Raises:
        CheckpointError: missing or unreadable source, or a muse checkpoint whose embedding is HTT.
        DataError: no embedding tensor found (or `key` absent).
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a .safetensors file or a muse run/checkpoint directory")
    if path.is_file():
        name, weight = _read_safetensors(path, key)
        return Source(path, name, weight, default_out=path.with_name(f"{path.stem}-htt"))
    from muse_lm.models.pretrained import read_model_dir

    ckpt, config, state = read_model_dir(path)
    model_cfg = config["model"]
    if model_cfg.get("embedding", "htt") != "dense":
        raise CheckpointError(f"{ckpt} already has an HTT embedding (embedding={model_cfg.get('embedding', 'htt')!r},"
                              f" tt_rank={model_cfg.get('tt_rank')}); there is no dense table to convert: pass a "
                              "run trained with --set embedding=dense, or a safetensors file")
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    name = find_embedding_key(list(state), shapes, key or "embed.weight", ckpt)
    source = Source(ckpt, name, state[name], default_out=ckpt.parent / f"{ckpt.name}-htt")
    if want_counts:
        source.token_counts, note = _run_token_counts(ckpt, config, state[name].shape[0])
        source.notes += [note] if note else []
    return source


def _run_token_counts(ckpt: Path, config: dict, vocab: int) -> tuple[Tensor | None, str | None]:
    """Token frequencies of a muse run's training split (from the token cache when it exists)."""
    import tokenizers

    from muse_lm.training.data import load_corpus, tokenize_corpus

    spec = config.get("run", {}).get("data")
    if not (ckpt / "tokenizer.json").is_file() or "run" not in config:
        return None, f"{ckpt} records no training run (no tokenizer.json or run config), so no token counts"
    tokenizer = tokenizers.Tokenizer.from_file(str(ckpt / "tokenizer.json"))
    try:
        corpus = load_corpus(spec)
        stored = config.get("corpus_fingerprint")
        if stored is not None and stored != corpus.fingerprint:
            return None, f"the run's corpus {corpus.name} changed since training, so its token counts were not used"
        tokens = tokenize_corpus(corpus, tokenizer)
    except DataError as err:
        return None, f"the run's corpus is not readable ({err}), so no token counts"
    log.info("muse convert: token counts from %s (%d tokens)", corpus.name, len(tokens.train))
    return torch.bincount(torch.from_numpy(tokens.train.astype("int64")), minlength=vocab)[:vocab], None


def read_counts(path: str | os.PathLike, vocab: int) -> Tensor:
    """Token counts from a .npy array or a .json list: one non-negative number per id."""
    import numpy as np

    path = Path(path).expanduser()
    try:
        if path.suffix == ".npy":
            counts = torch.from_numpy(np.load(path, allow_pickle=False).astype("float64"))
        else:
            counts = torch.tensor(json.loads(path.read_text(encoding="utf-8")), dtype=torch.float64)
    except (OSError, ValueError, TypeError) as err:
        raise DataError(f"--counts {path} is unreadable ({err}); give a .npy array or a .json list of "
                        "one count per token id") from None
    if counts.shape != (vocab,) or not bool((counts >= 0).all()):
        raise DataError(f"--counts {path} has shape {tuple(counts.shape)}; it needs {vocab} non-negative counts, "
                        "one per token id")
    return counts


# ---- writing and reading the result ------------------------------------------------------------
def conversion_report(result: ConversionResult, source: Source | None = None) -> dict:
    """The JSON-ready description of a conversion (stored in the output's metadata and sidecar)."""
    emb = result.module
    report = {"format": "muse_lm.htt/1", "vocab_size": emb.vocab_size, "d_model": emb.d_model,
              "num_cores": len(emb.cores), "vocab_factors": list(emb.vocab_factors),
              "dim_factors": list(emb.dim_factors), "tt_ranks": list(emb.tt_ranks),
              "dtype": str(emb.cores[0].dtype).removeprefix("torch."), "params_before": result.params_before,
              "params_after": result.params_after, "compression": result.compression, "error": result.error,
              "error_without_reorder": result.error_without_reorder, "reorder": result.reorder,
              "errors": result.errors, "notes": result.notes,
              "id_map": ("id_map[token id] = TT row; the permutation new id -> old id is argsort(id_map)"
                         if result.permutation is not None else None)}
    if source is not None:
        report.update(source=str(source.path), key=source.key, notes=source.notes + result.notes)
    return report


def save_conversion(result: ConversionResult, out: str | os.PathLike, report: dict) -> tuple[Path, Path]:
    """Writes `out` (safetensors: the module's state dict + report metadata) and its `.json` sidecar."""
    out = Path(out)
    sidecar = out.with_suffix(".json")
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in result.module.state_dict().items()}
    text = json.dumps(report, indent=2, sort_keys=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={_META_KEY: text})
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_text_atomic(sidecar, text + "\n")
    return out, sidecar


def load_converted(path: str | os.PathLike) -> HTTEmbedding:
    """The `HTTEmbedding` that `muse convert` wrote to `path` (with its id map, if any)."""
    path = Path(path)
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            report = json.loads((f.metadata() or {})[_META_KEY])
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (safetensors.SafetensorError, OSError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} is not an HTT file written by `muse convert` ({err})") from None
    emb = HTTEmbedding(report["vocab_size"], report["d_model"], max(report["tt_ranks"]), report["num_cores"],
                       vocab_factors=tuple(report["vocab_factors"]), dim_factors=tuple(report["dim_factors"]))
    emb.cores = nn.ParameterList(nn.Parameter(state[f"cores.{k}"]) for k in range(report["num_cores"]))
    emb.tt_ranks = tuple(report["tt_ranks"])
    emb.conversion_error = report["error"]
    if "id_map" in state:
        emb.id_map = state["id_map"]
    return emb


# ---- CLI ---------------------------------------------------------------------------------------
def add_convert_parser(sub) -> argparse.ArgumentParser:
    """Registers `muse convert` on an argparse subparsers object (its parser_class is used)."""
    p = sub.add_parser("convert", help="turn a trained dense embedding into HTT cores (TT-SVD)")
    p.add_argument("source", help="a .safetensors file (e.g. GPT-2's) or a muse run/checkpoint directory")
    p.add_argument("--rank", type=int, required=True, help="TT rank r (capped where the table allows less)")
    p.add_argument("--cores", type=int, choices=(2, 3), default=2, help="number of TT cores (default 2)")
    p.add_argument("--key", default=None,
                   help="name of the embedding tensor (default: found by name, e.g. wte.weight, embed_tokens.weight)")
    p.add_argument("--out", default=None,
                   help="output .safetensors (default: <source>-htt-r<R>.safetensors next to the source), plus a "
                        ".json sidecar")
    p.add_argument("--reorder", choices=REORDERS, default="auto",
                   help="id order to factorize in; auto keeps the lowest error (default auto)")
    p.add_argument("--counts", default=None,
                   help="token counts for --reorder frequency: .npy or .json list, one per id (default: a muse "
                        "run's own corpus)")
    p.set_defaults(func=cmd_convert)
    return p


def _output_path(args: argparse.Namespace, source: Source) -> Path:
    out = Path(args.out) if args.out else Path(f"{source.default_out}-r{args.rank}.safetensors")
    if out.suffix == ".json":
        raise ConfigError(f"--out {out} ends in .json, which is the sidecar's name; give a .safetensors path")
    if out.exists() and (out.is_dir() or out.resolve() == source.path.resolve()):
        raise ConfigError(f"--out {out} is the source or a directory; give a new .safetensors file path")
    return out


def cmd_convert(args: argparse.Namespace) -> int:
    """`muse convert SOURCE --rank R ...`: prints the result, writes the cores; returns 0."""
    if args.rank < 1:
        raise ConfigError(f"--rank {args.rank} is invalid: the TT rank must be >= 1 (e.g. --rank 16)")
    want_counts = args.reorder in ("auto", "frequency") and args.counts is None
    source = read_source(args.source, args.key, want_counts=want_counts)
    if args.counts is not None:
        source.token_counts = read_counts(args.counts, source.weight.shape[0])
    out = _output_path(args, source)
    result = convert_embedding(source.weight, rank=args.rank, num_cores=args.cores, reorder=args.reorder,
                               token_counts=source.token_counts)
    report = {**conversion_report(result, source), "rank": args.rank}
    out, sidecar = save_conversion(result, out, report)
    print(_summary(report, out, sidecar))
    return 0


def _summary(report: dict, out: Path, sidecar: Path) -> str:
    tried = ", ".join(f"{name} {err:.4f}" for name, err in report["errors"].items())
    inner = report["tt_ranks"][1:-1]
    lines = [
        f"source:      {report['source']} ({report['key']}, {report['vocab_size']} x {report['d_model']})",
        f"tt cores:    {report['num_cores']}, v={tuple(report['vocab_factors'])}, d={tuple(report['dim_factors'])}, "
        f"tt ranks {tuple(report['tt_ranks'])}",
        f"parameters:  {report['params_before']:,} -> {report['params_after']:,} "
        f"({report['compression']:.1f}x smaller)",
        f"error:       {report['error']:.4f} relative Frobenius (order: {report['reorder']}; original order "
        f"{report['error_without_reorder']:.4f})",
        f"orders:      {tried}",
    ]
    if max(inner) < report["rank"]:
        lines.append(f"note:        rank {report['rank']} capped to {tuple(inner)} (all the table's unfoldings hold)")
    lines += [f"note:        {note}" for note in report["notes"]]
    lines.append(f"output:      {out} (report: {sidecar})")
    return "\n".join(lines)


__all__ = ["EMBEDDING_KEYS", "REORDERS", "ConversionResult", "Source", "add_convert_parser", "cmd_convert",
           "conversion_report", "convert_embedding", "find_embedding_key", "load_converted", "read_counts",
           "read_source", "reorder_permutation", "save_conversion"]
