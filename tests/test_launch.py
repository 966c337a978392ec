"""The Slurm launcher: Slurm variables -> torch.distributed's, executor parameters, the submitted callable under
submitit's debug and local executors, and the pre-emption -> checkpoint -> requeue -> resume path."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
import zlib
from pathlib import Path

import pytest

from conftest import tiny_config
from selfsup.config import ConfigError, LauncherConfig, load_config
from selfsup.engine.checkpoint import load_checkpoint
from selfsup.launch import (
    TrainJob,
    distributed_env,
    executor_parameters,
    first_host,
    job_config,
    require_submitit,
    slurm_minutes,
    submit,
)

submitit = pytest.importorskip("submitit")


def _slurm_task(procid: int, localid: int) -> dict[str, str]:
    """The variables srun sets for one task of a 2-node x 4-task job."""
    return {"SLURM_JOB_ID": "4242", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
            "SLURM_NTASKS": "8", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
            "SLURM_NODEID": str(procid // 4)}


def test_slurm_variables_map_to_torch_distributed_env():
    tasks = [distributed_env(_slurm_task(procid, procid % 4)) for procid in range(8)]
    assert [t["RANK"] for t in tasks] == [str(r) for r in range(8)]
    assert [t["LOCAL_RANK"] for t in tasks] == ["0", "1", "2", "3"] * 2
    port = str(20000 + zlib.crc32(b"4242") % 40000)
    for task in tasks:  # what every task must agree on
        assert (task["WORLD_SIZE"], task["LOCAL_WORLD_SIZE"], task["MASTER_ADDR"], task["MASTER_PORT"]) == (
            "8", "4", "gpu07", port)
    assert distributed_env({**_slurm_task(3, 3), "MASTER_PORT": "29500"})["MASTER_PORT"] == "29500"
    local = {"SUBMITIT_LOCAL_JOB_ID": "77", "SUBMITIT_LOCAL_GLOBALID": "1", "SUBMITIT_LOCAL_LOCALID": "1",
             "SUBMITIT_LOCAL_NTASKS": "2"}
    assert distributed_env(local) == {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                                      "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(20000 + zlib.crc32(b"77") % 40000)}
    assert distributed_env({"PATH": "/bin"}) == {}  # not inside a job: one process


def test_first_host_of_slurm_node_lists():
    assert first_host("gpu[07-09,12],cpu1") == "gpu07"
    assert first_host("node3,node4") == "node3"
    assert first_host("solo") == "solo"
    assert first_host("r[1-2]-ib") == "r1-ib"
    with pytest.raises(ConfigError):
        first_host("")


def test_time_limits_in_minutes():
    cases = {"90m": 90, "24h": 1440, "1.5h": 90, "2-00:00:00": 2880, "01:30:00": 90, "45:30": 46, "1-12": 2160,
             "3600": 60}
    assert {text: slurm_minutes(text) for text in cases} == cases
    for bad in ("soon", "0m"):
        with pytest.raises(ConfigError, match="launcher.time"):
            slurm_minutes(bad)


def test_executor_parameters_one_task_per_gpu():
    launcher = LauncherConfig(name="slurm", nodes=2, gpus_per_node=8, cpus_per_task=10, time="72:00:00",
                              partition="gpu", account="lab", signal_delay_s=90)
    assert executor_parameters(launcher, "run") == {
        "name": "run", "nodes": 2, "tasks_per_node": 8, "gpus_per_node": 8, "cpus_per_task": 10,
        "timeout_min": 4320, "slurm_partition": "gpu", "slurm_account": "lab", "slurm_signal_delay_s": 90}
    assert executor_parameters(LauncherConfig(gpus_per_node=0), "cpu")["tasks_per_node"] == 1
    executor = submitit.AutoExecutor(folder="unused", cluster="debug")
    executor.update_parameters(**executor_parameters(launcher, "run"))  # submitit knows every key


def test_launcher_section_and_shorthand():
    cfg = load_config(None, ["launcher=slurm", "launcher.nodes=2", "launcher.partition=gpu"])
    assert (cfg.launcher.name, cfg.launcher.nodes, cfg.launcher.partition) == ("slurm", 2, "gpu")
    assert load_config(None, []).launcher.name == "local"
    with pytest.raises(ConfigError, match="did you mean 'launcher.nodes'"):
        load_config(None, ["launcher.node=2"])


def test_job_config_fixes_the_run_folder_and_checkpoint_requeues_with_resume_auto(tmp_path):
    cfg = tiny_config(tmp_path, "train.run_name=null")
    config = job_config(cfg, resume=tmp_path / "elsewhere" / "checkpoint.pt")
    assert config["train"]["run_name"].startswith("moco-digits-")  # a requeued job must find the same folder
    assert config["train"]["resume"] == str(tmp_path / "elsewhere" / "checkpoint.pt")
    assert job_config(cfg)["train"]["resume"] == "auto"
    job = TrainJob(config)
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    again = delayed.function
    assert isinstance(again, TrainJob) and again is not job
    assert again.config["train"]["resume"] == "auto"
    assert again.config["train"]["run_name"] == config["train"]["run_name"]
    assert job.config["train"]["resume"] != "auto"  # the original is left alone


def test_missing_submitit_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)
    with pytest.raises(ConfigError, match=r"pip install 'selfsup\[slurm\]'"):
        require_submitit()


def test_debug_executor_runs_the_job_in_process(tmp_path, monkeypatch):
    for name in ("SLURM_JOB_ID", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    cfg = tiny_config(tmp_path, "launcher=slurm", "train.max_steps=3", "train.device=cpu", "train.threads=1")
    job = submit(cfg, cluster="debug")
    assert job.result() == {}  # eval.at_end=false
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 3 and state["config"]["launcher"]["name"] == "slurm"
    assert (tmp_path / "run" / "slurm").is_dir()  # submitit's folder inside the run folder


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _steps_logged(metrics: Path) -> int:
    return sum('"loss"' in line for line in metrics.read_text().splitlines()) if metrics.is_file() else 0


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the task process through /proc")
def test_local_executor_preemption_checkpoints_requeues_and_resumes(tmp_path, monkeypatch):
    """submitit's signal mid-run: the trainer saves at a step boundary, submitit requeues the job (here: the
    local controller restarts the task), and the requeued job resumes from the run folder to the end."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("SLURM_JOB_ID", "WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    cfg = tiny_config(tmp_path, "launcher=slurm", "launcher.gpus_per_node=0", "train.epochs=3", "train.device=cpu",
                      "train.threads=1")
    job = submit(cfg, cluster="local")
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while _steps_logged(metrics) < 2 and time.monotonic() < deadline:
        assert not job.done(), job.stderr()
        time.sleep(0.02)
    tasks = _children(job._process.pid)  # the controller's child: the training task
    assert len(tasks) == 1
    os.kill(tasks[0], signal.SIGUSR2)
    job.wait()
    assert job.result() == {}, job.stderr()
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    stopped = [r["preempted_at_step"] for r in records if "preempted_at_step" in r]
    assert len(stopped) == 1 and 2 <= stopped[0] < 24, job.stdout()
    assert f"resumed from {tmp_path / 'run' / 'checkpoint.pt'} at epoch" in job.stdout()
    assert f", step {stopped[0]}\n" in job.stdout()
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, 25))  # every step once: the requeued job continued where the first stopped
    state = load_checkpoint(tmp_path / "run")
    assert (state["step"], state["epoch"]) == (24, 3)
