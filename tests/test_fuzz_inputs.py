"""Property tests: random CLI arguments, config dicts, data files and checkpoint folders end in a
clear error (exit code 2 with one `muse: error:` line, or a MuseUserError), never a traceback."""

from __future__ import annotations

import json
import string
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from muse_lm import cli
from muse_lm.errors import MuseUserError
from muse_lm.training.checkpoint import load_checkpoint
from muse_lm.training.data import load_corpus
from muse_lm.training.faults import FAULT_KINDS
from muse_lm.training.options import settable_keys
from muse_lm.training.recovery import RecoveryConfig
from muse_lm.training.stability import StabilityConfig

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

_text = st.text(alphabet=string.ascii_letters + string.digits + "-_.@=:/ ", max_size=12)
_value = st.one_of(_text, st.integers(-10, 10**6).map(str), st.floats(allow_nan=True).map(str),
                   st.sampled_from(["none", "true", "false", "inf", "-1", "0", "1e-3", "bf16", ""]))
_key = st.one_of(st.sampled_from(settable_keys()), _text)
_fault = st.one_of(st.tuples(st.sampled_from(FAULT_KINDS), st.integers(-3, 50)).map(lambda t: f"{t[0]}@{t[1]}"),
                   _text)
_arg = st.one_of(
    st.tuples(st.just("--set"), st.tuples(_key, _value).map(lambda kv: f"{kv[0]}={kv[1]}")),
    st.tuples(st.sampled_from(["--steps", "--stop-at", "--seed"]), _value),
    st.tuples(st.just("--inject-fault"), _fault),
    st.tuples(st.just("--preset"), st.one_of(_text, st.sampled_from(["tiny", "8gb", "auto"]))),
    st.tuples(st.sampled_from(["--resume", "--no-progress"])),
)


@SETTINGS
@given(args=st.lists(_arg, max_size=6))
def test_random_train_arguments_end_in_exit_2(args, tmp_path, capsys):
    # The data never exists, so even a fully valid command line stops before training.
    argv = ["train", "--out", str(tmp_path / "run"), "--data", str(tmp_path / "missing.txt")]
    argv += [a for group in args for a in group]
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("muse: error:")


_config_value = st.one_of(st.none(), st.booleans(), st.integers(-5, 100), st.floats(allow_nan=True), _text,
                          st.lists(st.integers(), max_size=2))


@SETTINGS
@given(cls=st.sampled_from([StabilityConfig, RecoveryConfig]),
       data=st.dictionaries(st.one_of(_text, st.sampled_from(["arm_after", "window", "loss_k", "stats_decay",
                                                               "decay_after", "lr_factor", "widen_factor"])),
                            _config_value, max_size=4))
def test_random_monitor_configs_are_valid_or_a_clear_error(cls, data):
    try:
        cls.from_dict(data)
    except MuseUserError as err:
        assert cls.__name__ in str(err)


@SETTINGS
@given(content=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)),
       suffix=st.sampled_from([".txt", ".jsonl", ".py", ""]))
def test_random_data_files_load_or_fail_clearly(content, suffix):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"data{suffix}"
        path.write_bytes(content)
        try:
            corpus = load_corpus(str(path))
        except MuseUserError as err:
            assert len(str(err)) > 20  # says what, why and how to fix
        else:
            assert corpus.train_docs or corpus.heldout_docs


_ckpt_files = st.dictionaries(
    st.sampled_from(["model.safetensors", "config.json", "checksums.json", "train_state.pt", "latest"]),
    st.one_of(st.binary(max_size=64), st.just(json.dumps({"format": 1, "files": {}}).encode()),
              st.just(b"step-0000001\n")),
    max_size=5)


@SETTINGS
@given(files=_ckpt_files)
def test_random_checkpoint_folders_are_a_clear_error(files):
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in files.items():
            (Path(tmp) / name).write_bytes(content)
        with pytest.raises(MuseUserError):
            load_checkpoint(tmp)
