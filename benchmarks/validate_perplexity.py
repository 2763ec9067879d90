"""Trained held-out perplexity of MuseLM (8gb preset shape) against the strong TransformerLM baseline
(matched non-embedding parameters; cut-cross-entropy head where it imports on CUDA) at equal tokens,
with the same tokenizer, data order, optimizer, LR schedule, batch and sequence length (issue 10).

Usage: PYTHONPATH=src python benchmarks/validate_perplexity.py [--tokens N] [--max-seconds S] [--data SPEC]
       [--compile auto|on|off] [--set KEY=VALUE ...] [--out DIR]
Same as `muse bench --only ppl`; writes DIR/ppl.json + DIR/ppl.png (benchmarks/results only when asked).
"""

import sys

from muse_lm.bench_quality import script_main

if __name__ == "__main__":
    sys.exit(script_main("ppl"))
