"""Every user mistake through ``python -m mtl_jax.main``: one ``error:`` line on stderr (the
last), exit code 2, no traceback (unless --verbose)."""
import pytest

from mtl_jax.checkpoints.manager import CheckpointManager
from mtl_jax.training import runner
from run_helpers import (cache_dir_for, main_env, persistent_compile_cache, run_main, tiny_config,
                         write_config_file)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A config file and a workdir holding a checkpoint of the hidden-32 tiny model."""
    root = tmp_path_factory.mktemp("errors")
    config_file = write_config_file(root)
    with persistent_compile_cache(cache_dir_for(tmp_path_factory)):
        config = tiny_config(root)
        run = runner.build_run(config)
        with CheckpointManager.from_config(str(root / "run"), config) as ckpt:
            ckpt.save(1, run.init_state(), config=config)
    return root, config_file, cache_dir_for(tmp_path_factory)


def assert_error(proc, expected, code=2):
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    assert [line for line in err if line.startswith("error:")] == [err[-1]]
    if expected.endswith("..."):  # messages that quote a path or an upstream reason
        assert err[-1].startswith(f"error: {expected[:-3]}"), err[-1]
    else:
        assert err[-1] == f"error: {expected}"


def main(setup, *args, devices=8):
    root, config_file, cache = setup
    return run_main(f"--config={config_file}", *args, env=main_env(devices, cache_dir=cache))


def test_unknown_flag(setup):
    assert_error(main(setup, "--workdr=/tmp/x"), "unknown flag --workdr; did you mean --workdir?")


def test_unknown_config_key(setup):
    assert_error(main(setup, "--workdir=/tmp/x", "--config.train.num_stepz=3"),
                 "unknown config key --config.train.num_stepz; did you mean "
                 "--config.train.num_steps, --config.train.nan_policy, "
                 "--config.train.batch_size?")


def test_missing_data_file(setup, tmp_path):
    missing = tmp_path / "nope.jsonl"
    assert_error(main(setup, f"--workdir={tmp_path / 'w'}",
                      f"--config.tasks.sent.data.train={missing}"),
                 f"tasks.sent.data.train: file {str(missing)!r} not found...")


def test_missing_data_with_verbose_shows_the_traceback(setup, tmp_path):
    proc = main(setup, f"--workdir={tmp_path / 'w'}", "--verbose",
                f"--config.tasks.sent.data.train={tmp_path / 'nope.jsonl'}")
    assert proc.returncode == 2 and "Traceback (most recent call last)" in proc.stderr


def test_workdir_not_writable(setup, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_error(main(setup, f"--workdir={blocker / 'run'}"),
                 f"workdir {blocker / 'run'} is not writable (Not a directory); pass a --workdir "
                 f"you can write to")


def test_checkpoint_of_another_model_shape(setup):
    root = setup[0]
    assert_error(main(setup, f"--workdir={root / 'run'}", "--config.model.size.hidden_size=64",
                      "--config.model.size.intermediate_size=128"),
                 f"checkpoint in {root / 'run'} holds a model of a different shape (param "
                 f"params/encoder/...")


def test_predict_on_an_unknown_task(setup):
    root = setup[0]
    assert_error(main(setup, f"--workdir={root / 'run'}", "--mode=predict", "--task=sst2"),
                 "unknown task 'sst2'; tasks in this config: ner, sent")


def test_eval_without_checkpoints(setup, tmp_path):
    assert_error(main(setup, f"--workdir={tmp_path}", "--mode=eval"),
                 f"no checkpoints in {tmp_path}; train first (--mode=train --workdir={tmp_path}) "
                 f"or point --workdir at a trained run")


@pytest.mark.parametrize("override, expected", [
    (["--config.tasks.sent.hub=glue", "--config.tasks.sent.hub_config=sst2",
      "--config.tasks.sent.data.train=train"],
     "tasks.sent: cannot load hub dataset glue/sst2[train] (..."),
    (["--config.model.name_or_path=nobody/no-such-model", "--config.model.random_init=false"],
     "cannot fetch 'nobody/no-such-model': the Hugging Face hub is unreachable or offline..."),
], ids=["dataset", "model"])
def test_hub_unreachable(setup, tmp_path, override, expected):
    assert_error(main(setup, f"--workdir={tmp_path / 'w'}", *override), expected)


def test_ctrl_c_outside_the_loop_is_one_line_exit_130(capsys):
    from mtl_jax.errors import user_errors

    with pytest.raises(SystemExit) as exit_info, user_errors():
        raise KeyboardInterrupt
    assert exit_info.value.code == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["interrupted: checkpoints already in the workdir are kept; "
                   "rerun the same command to resume"]
