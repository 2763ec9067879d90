"""A few real training steps of a preset's MuseLM on one GPU (bf16 autocast, fused AdamW, random
tokens): prints each loss and fails if any is not finite or the first is far from log(V).
A smoke check for the GPU kernels inside a whole model, not a benchmark.

    PYTHONPATH=src python benchmarks/check_train_gpu.py --preset 8gb --steps 10
"""

import argparse
import math

import torch

from muse_lm.models import MuseLM
from muse_lm.presets import get_preset
from muse_lm.training.optim import build_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="8gb")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4)
    args = ap.parse_args()
    preset = get_preset(args.preset)
    torch.manual_seed(0)
    device = torch.device("cuda")
    model = MuseLM(preset.model).to(device)
    opt = build_optimizer(model, preset.train, device)
    vocab, seq = preset.model.vocab_size, preset.train.seq_len
    # A learnable stream: a short random phrase repeated, so the loss must fall fast.
    phrase = torch.randint(0, vocab, (97,), device=device)
    data = phrase.repeat(args.batch * (seq + 1) // 97 + 1)[: args.batch * (seq + 1)].view(args.batch, seq + 1)
    losses = []
    for _ in range(args.steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(data[:, :-1], data[:, 1:])
        losses.append(float(loss.detach()))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    print("losses:", [round(x, 4) for x in losses], "log(V) =", round(math.log(vocab), 4))
    assert all(math.isfinite(x) for x in losses), losses
    assert abs(losses[0] - math.log(vocab)) < 1.0, losses[0]
    assert losses[-1] < losses[0] - 1.0, losses
    print("ok")


if __name__ == "__main__":
    main()
