"""The training loop: outputs of a short run, optimizer groups, LR schedule, accumulation,
overrides, and the Trainer used directly from Python."""

from __future__ import annotations

import gc
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from muse_lm.errors import ConfigError
from muse_lm.models import MuseConfig, MuseLM
from muse_lm.training import RunOptions, TrainConfig, Trainer, train
from muse_lm.training.checkpoint import load_checkpoint
from muse_lm.training.metrics import read_metrics
from muse_lm.training.optim import WarmupCosine, param_groups
from muse_lm.training.options import apply_overrides, parse_set_args, parse_value
from muse_lm.training.run import plan_run


def _run(corpus, out, overrides, **kw):
    return train(RunOptions(preset="tiny", data=str(corpus), out=str(out), overrides=overrides,
                            progress=False, **kw))


def test_short_run_lowers_heldout_loss_and_writes_outputs(small_corpus, tiny_overrides, tmp_path):
    tiny_overrides.update(checkpoint_every=5, keep_checkpoints=2)
    result = _run(small_corpus, tmp_path / "run", tiny_overrides, steps=20, seed=3)

    assert result.step == result.steps == 20
    assert result.end_eval_loss < result.start_eval_loss - 0.3
    # The untrained model is close to uniform over the 300-token vocabulary.
    assert abs(result.start_eval_loss - math.log(300)) < 0.5
    records = read_metrics(result.metrics_path)
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in train_lines] == list(range(1, 21))
    assert [r["step"] for r in eval_lines] == [0, 5, 10, 15, 20]
    for r in train_lines:
        assert {"loss", "ce", "aux", "lr", "grad_norm", "tokens_per_s", "elapsed_s"} <= set(r)
        assert math.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["ce"] + r["aux"], rel=1e-5)
        assert r["tokens_per_s"] > 0
    assert eval_lines[-1]["eval_ppl"] == pytest.approx(math.exp(eval_lines[-1]["eval_loss"]))
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run = result.run_dir
    assert sorted(p.name for p in run.glob("step-*")) == ["step-0000015", "step-0000020"]  # keep=2
    assert (run / "latest").read_text().strip() == "step-0000020"
    assert result.latest_checkpoint == run / "step-0000020"
    ckpt = load_checkpoint(run)
    assert ckpt.train_state["step"] == 20
    assert ckpt.config["preset"] == "tiny" and ckpt.config["model_type"] == "muse"
    assert ckpt.config["model"]["d_model"] == 32 and ckpt.config["train"]["seq_len"] == 32
    assert ckpt.config["run"]["overrides"]["d_model"] == 32 and ckpt.config["run"]["seed"] == 3
    assert len(ckpt.config["corpus_fingerprint"]) == 64
    assert json.loads(ckpt.tokenizer_json)["model"]["type"] == "BPE"
    assert ckpt.config["vocab_size"] == ckpt.config["model"]["vocab_size"] == 300


def test_trainer_from_python_trains_a_model_on_token_arrays(tmp_path):
    torch.manual_seed(0)
    pattern = torch.arange(40) % 7  # a periodic stream: easy to learn
    tokens = pattern.repeat(60).numpy().astype("uint16")
    model = MuseLM(MuseConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, max_rank=4, min_rank=1,
                              bk_heads=0, tt_rank=4, embedding="dense"))
    cfg = TrainConfig(seq_len=16, micro_batch=4, steps=15, lr=1e-2, warmup_steps=1, dtype="fp32",
                      eval_every=15, eval_batches=2, log_every=5)
    trainer = Trainer(model, cfg, train_tokens=tokens, heldout_tokens=tokens[:300], run_dir=tmp_path,
                      tokenizer_json="{}", run_config={"preset": "custom"}, progress=False)
    result = trainer.fit()
    assert result.end_eval_loss < result.start_eval_loss
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r] == [5, 10, 15]
    assert (tmp_path / "step-0000015" / "model.safetensors").is_file()


def test_param_groups_decay_only_matrices():
    model = MuseLM(MuseConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_rank=4, tt_rank=4))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"])
    assert any("in_proj" in n for n in decayed) and any("embed" in n for n in decayed)
    assert {n for n in kept if "norm" in n} and any(n.endswith("gate_bias") for n in kept)
    assert any(n.endswith(".bias") for n in kept) and any(n.endswith("A_log") for n in kept)
    assert len(decayed) + len(kept) == sum(1 for _ in model.parameters())


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0 and f(20) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    assert f(12) == pytest.approx(0.55)  # halfway through the cosine
    decay = [f(s) for s in range(4, 21)]
    assert all(a > b for a, b in zip(decay, decay[1:]))


def test_grad_accum_matches_one_big_micro_batch(small_corpus, tiny_overrides, tmp_path):
    """Micro-batch m of step s is batch s*accum + m, so 2 x 2 rows are the same 4 rows as 1 x 4:
    the accumulated (loss/accum) gradients must equal the big batch's."""
    big = _run(small_corpus, tmp_path / "big", {**tiny_overrides, "micro_batch": 4, "grad_accum": 1}, steps=6)
    acc = _run(small_corpus, tmp_path / "acc", {**tiny_overrides, "micro_batch": 2, "grad_accum": 2}, steps=6)
    big_lines = [r for r in read_metrics(big.metrics_path) if "loss" in r]
    acc_lines = [r for r in read_metrics(acc.metrics_path) if "loss" in r]
    for a, b in zip(big_lines, acc_lines, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)


def test_set_values_are_parsed_and_checked():
    assert parse_value("true") is True and parse_value("none") is None
    assert parse_value("64") == 64 and parse_value("1e-3") == 1e-3 and parse_value("soft") == "soft"
    overrides = parse_set_args(["d_model=64", "train.lr=1", "model.gate_mode=ste", "checkpoint_every=none"])
    assert overrides == {"d_model": 64, "lr": 1, "gate_mode": "ste", "checkpoint_every": None}
    model, cfg = apply_overrides(MuseConfig(), TrainConfig(), overrides)
    assert model.d_model == 64 and model.gate_mode == "ste"
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and cfg.checkpoint_every is None
    with pytest.raises(ConfigError, match="unknown key; valid keys are .*d_model"):
        parse_set_args(["dmodel=3"])
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set_args(["d_model"])
    with pytest.raises(ConfigError, match="takes a int"):
        apply_overrides(MuseConfig(), TrainConfig(), {"d_model": 2.5})
    with pytest.raises(ConfigError, match="seq_len"):
        apply_overrides(MuseConfig(), TrainConfig(), {"seq_len": 0})


def test_no_argument_plan_is_a_short_run_in_a_fresh_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = plan_run(RunOptions())
    assert plan.preset == "tiny" and plan.seed == 0 and plan.resume_from is None
    assert plan.run_dir.parent.name == "runs" and plan.run_dir.name.startswith("tiny-")
    assert plan.stop_at == plan.train.steps and plan.train.warmup_steps <= plan.train.steps // 20
    plan.run_dir.mkdir(parents=True)
    again = plan_run(RunOptions())
    assert again.run_dir != plan.run_dir and not again.run_dir.exists()


def test_inference_preset_plans_with_lns_ffns():
    plan = plan_run(RunOptions(preset="inference"))
    assert plan.train.lns


def test_lns_run_trains_lns_ffns_and_loads_them_frozen_to_8_bit_codes(small_corpus, tiny_overrides, tmp_path):
    from muse_lm.layers import LNSLinear
    from muse_lm.training.loading import load_trained

    tiny_overrides.update(lns=True)
    result = _run(small_corpus, tmp_path / "run", tiny_overrides, steps=8, seed=1)
    assert result.end_eval_loss < result.start_eval_loss
    trained = load_trained(result.run_dir)
    frozen = [m for m in trained.model.modules() if isinstance(m, LNSLinear)]
    assert frozen and all(not m.trainable for m in frozen)
    # The frozen codes are the ones the last training forward used: same logits as the latent model.
    ckpt = load_checkpoint(result.run_dir)
    latent = MuseLM(MuseConfig.from_dict(ckpt.config["model"]))
    from muse_lm.layers import convert_to_lns

    convert_to_lns(latent, "ffn", trainable=True)
    latent.load_state_dict(ckpt.model_state)
    ids = torch.randint(0, 300, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(trained.model.eval()(ids), latent.eval()(ids), rtol=1e-5, atol=1e-5)


def test_ddp_gradients_stay_in_the_all_reduce_buckets_across_steps(cli_env, tmp_path):
    """Under DDP (gradient_as_bucket_view) each gradient is a view into an all-reduce bucket. Clearing
    them with set_to_none would drop the views: the next step's no_sync micro-batches would then
    accumulate into fresh tensors beside the buckets (a second copy of every gradient, measured as
    0.76 GiB more mid-step than one GPU on the 24gb preset) until the reducer copies them back.
    So after every step the gradients are the same bucket views, zeroed in place.

    The group of one runs in a child process with a time limit, as every gloo test here does: gloo's
    worker threads, left in the pytest process, have no timeout around them and outlive the test."""
    env = {**cli_env, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"}
    for name in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        env.pop(name, None)  # a group of one in memory, whatever the caller's environment says
    proc = subprocess.run([sys.executable, __file__, "ddp-buckets", str(tmp_path)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert json.loads((tmp_path / "ddp_buckets.json").read_text()) == {"steps": 3, "bucket_views_kept": True}


def _ddp_buckets_worker(out: Path) -> None:
    """The child of the DDP bucket test: three steps of a tiny model under DDP on a gloo group of one;
    asserts that the gradients are bucket views, zeroed in place and the same tensors every step."""
    import faulthandler

    from muse_lm.training import distributed

    faulthandler.dump_traceback_later(240, exit=True)  # a hang says where, before the parent's limit
    info = distributed.setup(torch.device("cpu"), single_rank_group=True)  # a group of one, in memory
    trainer = None
    try:
        torch.manual_seed(0)
        tokens = (torch.arange(2000) % 13).numpy().astype("uint16")
        model = MuseLM(MuseConfig(vocab_size=16, d_model=32, n_layers=1, n_heads=2, max_rank=4, min_rank=1,
                                  bk_heads=0, tt_rank=4, embedding="dense"))
        cfg = TrainConfig(seq_len=16, micro_batch=2, grad_accum=2, steps=4, lr=1e-2, warmup_steps=1,
                          dtype="fp32", eval_every=3, eval_batches=1, log_every=1)
        trainer = Trainer(model, cfg, train_tokens=tokens, heldout_tokens=tokens[:300], run_dir=out / "run",
                          tokenizer_json="{}", run_config={}, progress=False, dist_info=info, parallel="ddp")
        params = [p for p in trainer.model.parameters() if p.requires_grad]
        trainer.train_step()  # DDP rebuilds its buckets once, in the order the first backward filled them
        trainer.train_step()
        first = [p.grad.data_ptr() if p.grad is not None else None for p in params]
        assert None not in first
        assert all(bool((p.grad == 0).all()) for p in params)  # cleared in place for the next step
        # Views into a few buckets: many parameters share one storage.
        assert len({p.grad.untyped_storage().data_ptr() for p in params}) < len(params)
        trainer.train_step()
        assert [p.grad.data_ptr() for p in params] == first
        (out / "ddp_buckets.json").write_text(json.dumps({"steps": trainer.step, "bucket_views_kept": True}))
    finally:
        # DDP holds the process group: free it while the interpreter is alive (see run.train), or
        # gloo's worker threads are torn down during interpreter shutdown.
        trainer = params = model = None
        gc.collect()
        distributed.teardown()
        faulthandler.cancel_dump_traceback_later()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "ddp-buckets":
        raise SystemExit("usage: test_trainer.py ddp-buckets OUT (the child of the DDP bucket test)")
    _ddp_buckets_worker(Path(sys.argv[2]))
