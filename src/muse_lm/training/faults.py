"""Fault injection for testing the recovery ladder: `muse train --inject-fault KIND@STEP`.

Kinds (STEP is the 0-based optimizer step the fault hits):

- `nan_loss`: the step's loss becomes NaN (so do its gradients);
- `inf_grad`: one gradient element becomes +inf after backward;
- `loss_spike`: a large real loss excursion: the step's first micro-batch is replaced by
  uniformly random tokens (a corrupted batch) and its loss scaled by 10 (like an LR spike);
- `bad_layer`: the weight matrices of the middle block are multiplied by 1e30 before the step
  (activations overflow, the loss becomes inf/NaN);
- `crash`: the process dies (`os._exit(17)`) at the start of the step;
- `crash_in_save`: the process dies in the middle of writing the checkpoint of step STEP
  (after the model file, while pickling train_state.pt).

`KIND@STEP:rankN` fires on rank N only (under torchrun; `nan_loss@5:rank1` poisons rank 1's loss
and no other): how the tests show that one rank's trouble makes every rank take the same
recovery. Without the suffix a fault fires on every rank. A targeted fault is marked fired on
every rank, so the fired list rank 0 saves is the whole run's.

A fault fires once: fired faults are stored in the train state, so steps replayed after a
rollback (or after resuming from a checkpoint written after the fault) do not re-fire them.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import torch

from muse_lm.errors import ConfigError

FAULT_KINDS = ("nan_loss", "inf_grad", "loss_spike", "bad_layer", "crash", "crash_in_save")
CRASH_EXIT_CODE = 17
SPIKE_SCALE = 10.0
BAD_LAYER_SCALE = 1e30


def parse_fault_target(spec: str) -> tuple[str, int, int | None]:
    """"nan_loss@50" -> ("nan_loss", 50, None); "nan_loss@50:rank1" -> ("nan_loss", 50, 1);
    ConfigError for anything else."""
    kind, sep, rest = str(spec).partition("@")
    if not sep or kind not in FAULT_KINDS:
        raise ConfigError(f"--inject-fault {spec!r} is invalid: use KIND@STEP with KIND one of "
                          f"{', '.join(FAULT_KINDS)} (e.g. nan_loss@50, or nan_loss@50:rank1 for one rank)")
    step, colon, target = rest.partition(":")
    if not step.isdigit() or not step.isascii():
        raise ConfigError(f"--inject-fault {spec!r}: STEP {step!r} must be an integer >= 0 (e.g. {kind}@50)")
    rank = None
    if colon:
        number = target.removeprefix("rank")
        if not target.startswith("rank") or not number.isdigit() or not number.isascii():
            raise ConfigError(f"--inject-fault {spec!r}: {target!r} must be rankN with N a rank number "
                              f"(e.g. {kind}@{step}:rank1)")
        rank = int(number)
    return kind, int(step), rank


def parse_fault(spec: str) -> tuple[str, int]:
    """"nan_loss@50" (or "nan_loss@50:rank1") -> ("nan_loss", 50); ConfigError for anything else."""
    kind, step, _ = parse_fault_target(spec)
    return kind, step


def _die(message: str) -> None:
    print(f"muse: injected fault: {message}", file=sys.stderr, flush=True)
    os._exit(CRASH_EXIT_CODE)


class _CrashOnPickle:
    """Placed in the train state of a `crash_in_save` checkpoint: pickling it (mid-write of
    train_state.pt, after model.safetensors is on disk) kills the process."""

    def __init__(self, step: int) -> None:
        self.step = step

    def __reduce__(self):
        _die(f"crash_in_save at step {self.step}")
        return (int, (0,))  # not reached


@dataclass
class FaultPlan:
    """The faults of a run and which have fired."""

    faults: list[tuple[str, int]] = field(default_factory=list)
    fired: set[tuple[str, int]] = field(default_factory=set)
    targets: dict[tuple[str, int], int] = field(default_factory=dict)  # fault -> the only rank it hits
    rank: int = 0  # this process's rank (set by the trainer)

    @classmethod
    def parse(cls, specs: list[str] | tuple[str, ...]) -> FaultPlan:
        parsed = [parse_fault_target(s) for s in specs]
        return cls([(k, s) for k, s, _ in parsed], targets={(k, s): r for k, s, r in parsed if r is not None})

    def check_ranks(self, world_size: int) -> None:
        """ConfigError when a `:rankN` fault names a rank this run does not have (it would never fire)."""
        for (kind, step), rank in sorted(self.targets.items()):
            if rank >= world_size:
                raise ConfigError(f"--inject-fault {kind}@{step}:rank{rank}: this run has {world_size} "
                                  f"process(es), ranks 0..{world_size - 1}; name one of those")

    def due(self, kind: str, step: int) -> bool:
        """True (once) when `kind` is planned at `step` for this rank and has not fired; marks it
        fired (on every rank, also those it does not hit)."""
        key = (kind, step)
        if key in self.fired or key not in self.faults:
            return False
        self.fired.add(key)
        return self.targets.get(key, self.rank) == self.rank

    # ---- the hooks the trainer calls ------------------------------------------------------------
    def before_step(self, step: int, model: torch.nn.Module) -> str | None:
        """crash / bad_layer; returns a description of what fired (or None)."""
        if self.due("crash", step):
            _die(f"crash at step {step}")
        if self.due("bad_layer", step):
            blocks = getattr(model, "blocks", None)
            target = blocks[len(blocks) // 2] if blocks is not None else model
            with torch.no_grad():
                for p in target.parameters():
                    if p.dim() >= 2:
                        p.mul_(BAD_LAYER_SCALE)
            return "bad_layer"
        return None

    def corrupt_batch(self, step: int, x: torch.Tensor, y: torch.Tensor, vocab: int | None
                      ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """loss_spike: random tokens (from a generator seeded by the step, so the global RNG
        stream is untouched) and the loss scale to apply; else (x, y, 1.0)."""
        if not self.due("loss_spike", step):
            return x, y, 1.0
        vocab = vocab or int(max(x.max(), y.max())) + 1
        gen = torch.Generator().manual_seed(step)
        x = torch.randint(0, vocab, x.shape, generator=gen).to(x.device)
        y = torch.randint(0, vocab, y.shape, generator=gen).to(y.device)
        return x, y, SPIKE_SCALE

    def corrupt_loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        return loss * float("nan") if self.due("nan_loss", step) else loss

    def corrupt_grads(self, step: int, model: torch.nn.Module) -> None:
        if self.due("inf_grad", step):
            for p in model.parameters():
                # This rank's shard under FSDP (a shard can be empty on small parameters).
                grad = p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad
                if grad is not None and grad.numel():
                    grad.view(-1)[0] = float("inf")
                    return

    def save_marker(self, step: int) -> _CrashOnPickle | None:
        return _CrashOnPickle(step) if self.due("crash_in_save", step) else None

    def state_dict(self) -> list[list]:
        return sorted([k, s] for k, s in self.fired)

    def load_state_dict(self, state: list[list]) -> None:
        self.fired = {(str(k), int(s)) for k, s in state}
