"""The `muse` command: train, generate, eval, presets, estimate, convert, bench, serve.

Results go to stdout (with `--json`: exactly one single-line JSON object); progress, logs and
warnings go to stderr. Every user mistake exits with code 2 and one line
`muse: error: <what, why, how to fix>`; only our own validation errors (`MuseUserError`) and
argparse's are turned into that, so a bug still shows its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
from typing import NoReturn

from muse_lm.bench_quality import add_bench_parser
from muse_lm.convert import add_convert_parser
from muse_lm.errors import MuseUserError
from muse_lm.serving.cli import add_serve_parser

log = logging.getLogger("muse_lm")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        """One line instead of argparse's usage block + error."""
        self.exit(2, f"muse: error: {message} (see `{self.prog} --help`)\n")


def _number(cast, name: str, *, minimum: float, inclusive: bool = True, maximum: float | None = None):
    """An argparse type: `cast(text)` within [minimum, maximum] (or (minimum, maximum])."""

    def parse(text: str):
        try:
            value = cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} {text!r} is not a valid {cast.__name__}") from None
        low_ok = value >= minimum if inclusive else value > minimum
        if not low_ok or (maximum is not None and value > maximum) or not math.isfinite(value):
            bound = f"{'>=' if inclusive else '>'} {minimum:g}" + (f" and <= {maximum:g}" if maximum else "")
            raise argparse.ArgumentTypeError(f"{name} {text} is invalid: it must be {bound}")
        return value

    return parse


def _common_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a model (no arguments: the auto preset on the stdlib corpus)")
    p.add_argument("--preset", default=None, help="preset name or alias (default: auto; see `muse presets`)")
    p.add_argument("--data", default=None,
                   help="text file, .jsonl, directory, glob, python-stdlib (default) or python-sources")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json to use (default: train one, cached)")
    p.add_argument("--steps", type=_number(int, "--steps", minimum=1), default=None,
                   help="total optimizer steps (default: the preset's)")
    p.add_argument("--stop-at", type=_number(int, "--stop-at", minimum=1), default=None,
                   help="stop after this step with a checkpoint (continue later with --resume)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<preset>-<timestamp>)")
    p.add_argument("--seed", type=_number(int, "--seed", minimum=0), default=None,
                   help="orders the training data and seeds the init (default 0)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its latest checkpoint")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a MuseConfig/TrainConfig field, e.g. --set d_model=64 (repeatable)")
    p.add_argument("--inject-fault", dest="faults", action="append", default=[], metavar="KIND@STEP",
                   help="inject a fault to test recovery (repeatable): nan_loss, inf_grad, loss_spike, "
                        "bad_layer, crash or crash_in_save, e.g. nan_loss@50 (see docs/stability.md)")
    p.add_argument("--parallel", choices=("none", "ddp", "fsdp"), default=None,
                   help="several GPUs under torchrun: ddp (replicated model) or fsdp (FSDP2, sharded "
                        "model); default: ddp when WORLD_SIZE > 1, else none (see docs/distributed.md)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress on stderr")
    _common_device(p)
    p.set_defaults(func=cmd_train)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model")
    p.add_argument("--checkpoint", required=True, help="run directory or step-NNNNNNN directory")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--max-new-tokens", type=_number(int, "--max-new-tokens", minimum=0), default=200)
    p.add_argument("--temperature", type=_number(float, "--temperature", minimum=0.0), default=0.8,
                   help="0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=_number(int, "--top-k", minimum=1), default=None)
    p.add_argument("--top-p", type=_number(float, "--top-p", minimum=0.0, inclusive=False, maximum=1.0),
                   default=None)
    p.add_argument("--repetition-penalty", type=_number(float, "--repetition-penalty", minimum=0.0, inclusive=False),
                   default=1.0, help="> 1 pushes down tokens already in the prompt or the output (logit / p if "
                                     "positive, logit * p if not); 1 = off (default)")
    p.add_argument("--seed", type=_number(int, "--seed", minimum=0), default=None,
                   help="sampling seed (default: random)")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT",
                   help="end the continuation before this text (repeatable)")
    _common_device(p)
    p.set_defaults(func=cmd_generate)


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="held-out loss and perplexity of a trained model")
    p.add_argument("--checkpoint", required=True, help="run directory or step-NNNNNNN directory")
    p.add_argument("--data", default=None, help="corpus whose held-out split to score (default: the run's)")
    p.add_argument("--batches", type=_number(int, "--batches", minimum=1), default=None,
                   help="held-out batches to score (default: the run's eval_batches)")
    p.add_argument("--json", action="store_true", help="print one JSON line on stdout")
    _common_device(p)
    p.set_defaults(func=cmd_eval)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="muse", description="Train and run memory-efficient linear-time language models.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    _add_train(sub)
    _add_generate(sub)
    _add_eval(sub)
    p = sub.add_parser("presets", help="compare the presets (one row each, with aliases)")
    p.set_defaults(func=cmd_presets)
    p = sub.add_parser("estimate", help="parameters and peak training memory of a preset")
    p.add_argument("--preset", default="auto", help="preset name or alias (default: auto)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--json", action="store_true", help="print one JSON line on stdout")
    p.set_defaults(func=cmd_estimate)
    add_convert_parser(sub)
    add_bench_parser(sub)
    add_serve_parser(sub)
    return parser


def _version() -> str:
    from muse_lm import __version__

    return f"muse {__version__}"


# ---- commands ----------------------------------------------------------------------------------
def cmd_train(args: argparse.Namespace) -> int:
    from muse_lm.training.distributed import env_dist_info
    from muse_lm.training.options import RunOptions, parse_set_args
    from muse_lm.training.recovery import TrainingStopped
    from muse_lm.training.run import train

    options = RunOptions(preset=args.preset, data=args.data, tokenizer=args.tokenizer, steps=args.steps,
                         stop_at=args.stop_at, out=args.out, seed=args.seed, resume=args.resume,
                         overrides=parse_set_args(args.sets), device=args.device, progress=args.progress,
                         faults=args.faults, parallel=args.parallel)
    try:
        result = train(options)
    except TrainingStopped as err:
        print(f"muse: training stopped: {err}", file=sys.stderr)
        return 3
    if env_dist_info().is_main:
        _print_train_summary(result)
    return 0


def _print_train_summary(result) -> None:
    from muse_lm.training.evaluate import EvalResult

    ckpt = result.latest_checkpoint
    lines = [
        f"run directory:     {result.run_dir}",
        f"latest checkpoint: {ckpt}",
        f"metrics:           {result.metrics_path}",
        f"loss plot:         {result.plot_path}",
    ]
    if result.start_eval_loss is not None and result.end_eval_loss is not None:
        end_ppl = EvalResult(result.end_eval_loss, 0).perplexity
        lines.append(f"held-out loss:     {result.start_eval_loss:.4f} at step 0 -> "
                     f"{result.end_eval_loss:.4f} at step {result.step} (perplexity {end_ppl:.2f})")
    lines.append(f"steps:             {result.step} of {result.steps} "
                 f"in {result.elapsed_s:.1f} s of training")
    if result.step < result.steps:
        lines.append(f"continue with:     muse train --out {result.run_dir} --resume")
    lines.append(f'next:              muse generate --checkpoint {ckpt} --prompt "def "')
    print("\n".join(lines))


def _device(requested: str | None):
    from muse_lm.training.distributed import DistInfo
    from muse_lm.training.run import resolve_device

    return resolve_device(requested, DistInfo())


def cmd_generate(args: argparse.Namespace) -> int:
    import torch

    from muse_lm.serving.text import TextStream
    from muse_lm.training.loading import load_trained
    from muse_lm.training.tokenizer import eos_id

    if any(not s for s in args.stop):
        raise MuseUserError("--stop '' is empty: pass the text the continuation should end before")
    device = _device(args.device)
    trained = load_trained(args.checkpoint, device)
    tok = trained.tokenizer
    eos = eos_id(tok)
    # An empty prompt starts from a document boundary, as every training document does.
    prompt_ids = tok.encode(args.prompt, add_special_tokens=False).ids or [eos]
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)
    steps = trained.model.generate_stream(ids, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                                          top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                                          seed=args.seed, eos_token_id=eos)
    # Tokens are printed as they come; TextStream holds back a character cut mid-UTF-8 and any tail
    # that could begin a stop string.
    text = TextStream(tok, stop=tuple(args.stop))
    sys.stdout.write(args.prompt)
    sys.stdout.flush()
    for nxt in steps:
        token = int(nxt[0])
        if token == eos:
            break
        sys.stdout.write(text.add(token))
        sys.stdout.flush()
        if text.stopped:
            break
    steps.close()
    sys.stdout.write(text.flush() + "\n")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from muse_lm.training.data import heldout_batches, load_corpus, tokenize_corpus
    from muse_lm.training.evaluate import evaluate_loss, validate_token_ids
    from muse_lm.training.loading import load_trained

    device = _device(args.device)
    trained = load_trained(args.checkpoint, device)
    config = trained.config
    train_cfg = config.get("train", {})
    spec = args.data if args.data is not None else config.get("run", {}).get("data")
    corpus = load_corpus(spec)
    stored = config.get("corpus_fingerprint")
    same = stored == corpus.fingerprint
    if not same:
        log.warning("muse: warning: evaluating on %s, not the corpus this model was trained on (fingerprint "
                    "%s, now %s): the numbers are not comparable with the run's held-out loss",
                    corpus.name, str(stored)[:12], corpus.fingerprint[:12])
    tokens = tokenize_corpus(corpus, trained.tokenizer)
    validate_token_ids(trained.model, [tokens.heldout])
    # By default the same held-out windows the run scored (its ranks shared eval_batches x world_size).
    default_batches = train_cfg.get("eval_batches", 8) * config.get("run", {}).get("world_size", 1)
    batches = heldout_batches(tokens.heldout, seq_len=train_cfg.get("seq_len", 256),
                              batch_size=train_cfg.get("micro_batch", 8),
                              max_batches=args.batches or default_batches)
    result = evaluate_loss(trained.model, batches, device, dtype=train_cfg.get("dtype", "fp32"))
    ppl = result.perplexity if math.isfinite(result.perplexity) else None  # JSON has no inf
    record = {"loss": result.loss, "perplexity": ppl,
              "tokens": result.tokens, "checkpoint": str(trained.path), "step": trained.step,
              "data": corpus.name, "corpus_fingerprint": corpus.fingerprint, "same_corpus": same}
    if args.json:
        print(json.dumps(record))
    else:
        print(f"checkpoint:    {trained.path}\ndata:          {corpus.name} (held-out split)\n"
              f"held-out loss: {result.loss:.4f} nats/token\nperplexity:    {result.perplexity:.2f}\n"
              f"tokens:        {result.tokens:,}")
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from muse_lm.presets import print_preset_comparison

    print_preset_comparison(file=sys.stdout)
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    from muse_lm.presets import estimate_memory, get_preset
    from muse_lm.training.options import apply_overrides, parse_set_args

    preset = get_preset(args.preset)
    model_cfg, train_cfg = apply_overrides(preset.model, preset.train, parse_set_args(args.sets))
    est = estimate_memory(dataclasses.replace(preset, model=model_cfg, train=train_cfg))
    if args.json:
        print(json.dumps(est))
        return 0
    for key, value in est.items():
        if isinstance(value, float):
            value = f"{value:.3f}"
        elif isinstance(value, int) and not isinstance(value, bool):
            value = f"{value:,}"
        print(f"{key + ':':<24}{value}")
    return 0


# ---- entry point -------------------------------------------------------------------------------
def _configure_logging() -> None:
    """Library logs (progress lines, warnings) to stderr; ranks other than 0 only warn."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    """`muse ...`; returns the exit code (0 ok, 2 user error)."""
    args = build_parser().parse_args(argv)
    _configure_logging()
    try:
        return args.func(args)
    except MuseUserError as err:
        message = " ".join(str(err).split())
        print(f"muse: error: {message}", file=sys.stderr)
        return 2
