"""Slurm through submitit: ``selfsup train RECIPE launcher=slurm launcher.nodes=2 launcher.gpus_per_node=8``.

:func:`submit` fixes the run folder, then submits one :class:`TrainJob` per task (one task per GPU). Each task maps
Slurm's variables to torch.distributed's (:func:`distributed_env`) and trains with ``train.resume=auto``.

Pre-emption and time-out: Slurm sends submitit's signal (USR2) ``launcher.signal_delay_s`` before the time limit
(and on pre-emption where the cluster sends user signals). The trainer writes its checkpoint at the next step
boundary; then submitit's handler calls :meth:`TrainJob.checkpoint` (the same job, ``resume=auto``) and requeues it,
and the requeued job resumes from the run folder. On SIGTERM (``scancel``, or pre-emption without a user signal,
after which Slurm requeues a requeueable job itself) the task checkpoints and stops without requeueing.
``launcher.requeue=false`` stops after the checkpoint in every case; the same command resumes by hand.
"""

from __future__ import annotations

import copy
import os
import re
import signal
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from selfsup.config import Config, ConfigError, LauncherConfig, check_choice, config_from_dict

LAUNCHERS = ("local", "slurm")
PREEMPT_SIGNAL_ENV = "SUBMITIT_PREEMPT_SIGNAL"  # submitit's setting; its default is USR2


def require_submitit() -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError("launcher.name=slurm needs submitit: pip install 'selfsup[slurm]'") from None
    return submitit


# ------------------------------------------------------------------------------ pure mappings


def slurm_minutes(text: str) -> int:
    """Minutes (rounded up) in ``launcher.time``: ``90m``, ``24h``, or Slurm's ``[D-]HH:MM:SS``, ``D-HH``, ``MM:SS``."""
    from selfsup.engine.budget import parse_duration

    text = str(text).strip()
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if match and ("-" in text or ":" in text):
        days, first, second, third = (int(g) if g else 0 for g in match.groups())
        if match.group(1):  # D-HH[:MM[:SS]]
            seconds = ((days * 24 + first) * 60 + second) * 60 + third
        elif match.group(4):  # HH:MM:SS
            seconds = (first * 60 + second) * 60 + third
        else:  # MM:SS
            seconds = first * 60 + second
    else:
        try:
            seconds = parse_duration(text)
        except ConfigError:
            raise ConfigError(f"launcher.time={text!r} is not a duration; write e.g. 90m, 24h or 2-00:00:00") from None
    if seconds <= 0:
        raise ConfigError(f"launcher.time must be positive, got {text!r}")
    return -(-int(seconds) // 60)


def first_host(nodelist: str) -> str:
    """The first host name of a Slurm node list: ``gpu[07-09,12],cpu1`` -> ``gpu07``."""
    match = re.match(r"([^,\[]*)(?:\[([^\]]*)\])?([^,]*)", nodelist.strip())
    if not match or not (match.group(1) or match.group(2)):
        raise ConfigError(f"cannot read a host name from the Slurm node list {nodelist!r}")
    prefix, ranges, suffix = match.groups()
    first = re.split(r"[,-]", ranges)[0] if ranges else ""
    return f"{prefix}{first}{suffix}"


def distributed_env(env: Mapping[str, str]) -> dict[str, str]:
    """torch.distributed's ``env://`` variables for this task, from Slurm's (or submitit's local executor's).

    Rank, world size and local rank are the task's; the master is the job's first node, on a port every task
    derives alike from the job id (or ``MASTER_PORT`` when set). Empty outside a job: one process.
    """
    if "SLURM_JOB_ID" in env and "SLURM_PROCID" in env:
        rank, world, local = env["SLURM_PROCID"], env["SLURM_NTASKS"], env.get("SLURM_LOCALID", "0")
        nodes = int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", "1")))
        master = first_host(env.get("SLURM_JOB_NODELIST", env.get("SLURM_NODELIST", "127.0.0.1")))
        job_id = env["SLURM_JOB_ID"]
    elif "SUBMITIT_LOCAL_JOB_ID" in env:
        rank, world, local = env["SUBMITIT_LOCAL_GLOBALID"], env["SUBMITIT_LOCAL_NTASKS"], env["SUBMITIT_LOCAL_LOCALID"]
        nodes, master, job_id = 1, "127.0.0.1", env["SUBMITIT_LOCAL_JOB_ID"]
    else:
        return {}
    port = env.get("MASTER_PORT") or str(20000 + zlib.crc32(job_id.encode()) % 40000)
    return {"RANK": rank, "WORLD_SIZE": world, "LOCAL_RANK": local, "LOCAL_WORLD_SIZE": str(int(world) // nodes),
            "MASTER_ADDR": master, "MASTER_PORT": port}


def executor_parameters(launcher: LauncherConfig, job_name: str) -> dict[str, Any]:
    """submitit ``AutoExecutor`` parameters: one task per GPU (one per node without GPUs)."""
    parameters = {
        "name": job_name, "nodes": launcher.nodes, "tasks_per_node": max(launcher.gpus_per_node, 1),
        "gpus_per_node": launcher.gpus_per_node, "cpus_per_task": launcher.cpus_per_task,
        "timeout_min": slurm_minutes(launcher.time), "mem_gb": launcher.mem_gb,
        "slurm_partition": launcher.partition, "slurm_account": launcher.account, "slurm_qos": launcher.qos,
        "slurm_constraint": launcher.constraint, "slurm_signal_delay_s": launcher.signal_delay_s,
    }
    return {key: value for key, value in parameters.items() if value is not None}


def job_config(cfg: Config, resume: str | Path | None = None) -> dict[str, Any]:
    """The config a job trains: a fixed run folder (a requeued job must find it) and ``resume`` (default auto)."""
    raw = cfg.to_dict()
    train = raw["train"]
    train["run_name"] = cfg.run_name()
    train["resume"] = str(resume) if resume else (train["resume"] or "auto")
    return raw


# ------------------------------------------------------------------------------ the job


class TrainJob:
    """The callable submitit runs in every task. It holds a plain config dict (pickles without live objects)."""

    def __init__(self, config: dict[str, Any]):
        self.config = config

    def __call__(self) -> dict[str, Any]:
        from selfsup.api import build_trainer
        from selfsup.engine.trainer import Preempted
        from selfsup.nn import distributed

        os.environ.update(distributed_env(os.environ))
        cfg = config_from_dict(self.config)
        preempt_signal = submitit_signal() if "SUBMITIT_EXECUTOR" in os.environ else None
        requeue = signal.getsignal(preempt_signal) if preempt_signal is not None else None
        try:
            trainer = build_trainer(cfg)
            if preempt_signal is not None and preempt_signal not in trainer.preemption_signals:
                trainer.preemption_signals = (*trainer.preemption_signals, preempt_signal)
            return trainer.fit()
        except Preempted:
            # the checkpoint is written. submitit's signal (time limit, pre-emption): its handler calls
            # self.checkpoint(), requeues and exits (rank 0). SIGTERM (scancel; pre-emption without a user signal,
            # which Slurm requeues itself when the job is requeueable): stop here
            if cfg.launcher.requeue and callable(requeue) and trainer._signal == preempt_signal:
                requeue(preempt_signal, None)
                if int(os.environ.get("RANK", 0)) != 0:
                    return {"preempted": True}  # rank 0 requeues the whole job
            raise
        finally:
            distributed.shutdown()

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit's requeue hook: the same job, resuming from the run folder's checkpoint."""
        config = copy.deepcopy(self.config)
        config["train"]["resume"] = "auto"
        return require_submitit().helpers.DelayedSubmission(type(self)(config))


def submitit_signal() -> signal.Signals:
    name = "SIG" + os.environ.get(PREEMPT_SIGNAL_ENV, "USR2")
    if not hasattr(signal, name):
        raise ConfigError(f"{PREEMPT_SIGNAL_ENV}={os.environ[PREEMPT_SIGNAL_ENV]!r} is not a signal name (e.g. USR2)")
    return getattr(signal, name)


def submit(cfg: Config, *, resume: str | Path | None = None, cluster: str = "slurm") -> Any:
    """Submit the run as a submitit job (``cluster``: slurm; local or debug for tests); returns the job."""
    check_choice("launcher.name", cfg.launcher.name, LAUNCHERS)
    submitit = require_submitit()
    config = job_config(cfg, resume)
    run_dir = Path(cfg.train.output_dir) / config["train"]["run_name"]
    folder = Path(cfg.launcher.folder) if cfg.launcher.folder else run_dir / "slurm"
    try:
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster,
                                         slurm_max_num_timeout=cfg.launcher.max_requeues,
                                         local_max_num_timeout=cfg.launcher.max_requeues)
    except RuntimeError as error:  # e.g. no srun on this machine
        raise ConfigError(f"launcher.name=slurm: {error}") from None
    executor.update_parameters(**executor_parameters(cfg.launcher, config["train"]["run_name"]))
    return executor.submit(TrainJob(config))
