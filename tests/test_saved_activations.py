"""benchmarks/saved_activations.py on the CPU (its own TRITON_INTERPRET=1 process): the tiny preset's
compiled block, per-token costs from two lengths, the JSON it writes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_block_compiled(tmp_path):
    out = tmp_path / "saved.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "saved_activations.py"), "--preset", "tiny",
                           "--seq-len", "32", "--compiled", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["compiled"] and res["d_model"] == 128 and res["fixed_bytes"] > 0
    rows = {(tuple(shape), dtype): per_token for shape, dtype, _, per_token in res["activations"]}
    assert abs(sum(rows.values()) - res["per_token"]) < 1e-6
    # The SwiGLU's w13 output (2 x ffn_hidden 384) is saved: 32 tokens, bf16, 1536 bytes a token.
    assert rows[((32, 768), "bfloat16")] == 1536, sorted(rows)
    # Not kept: the SwiGLU's product (ffn_hidden 384; recomputed in the backward) and the norms' outputs
    # in fp32 (they hand on bf16 under autocast): the only fp32 d_model row is the residual stream.
    assert ((32, 384), "bfloat16") not in rows and rows[((1, 32, 128), "float32")] == 512, sorted(rows)
    # Rebuilt in the backward (layers/recompute.py), so not kept: the norms' outputs and the conv's (the
    # matmuls' 2-D inputs [32, d_model 128]); out_proj's input (only z, [32, d_inner 256], is kept); the
    # gated u and v (only the projection's u and v, [1, 32, 4 heads, rank 16]). The one bf16 d_model
    # row kept is the mixer's output, from which the backward rebuilds the second norm's input.
    assert ((32, 128), "bfloat16") not in rows, sorted(rows)
    assert rows[((32, 256), "bfloat16")] == 512 and rows[((1, 32, 4, 16), "bfloat16")] == 256, sorted(rows)
    assert rows[((1, 32, 128), "bfloat16")] == 256, sorted(rows)
    # The scan's values come out of their own GEMM, contiguous: no copy of them beside the projection.
    assert res["per_token_distinct_storage"] <= res["per_token"], res
    assert "activations:" in proc.stdout


def test_refuses_to_run_without_the_interpreter():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT / "src")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "saved_activations.py")], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "TRITON_INTERPRET=1" in proc.stderr
