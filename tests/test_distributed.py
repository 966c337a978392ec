"""Two CPU processes with gloo under torchrun: gathers, ShuffleBN, and a DDP MoCo run whose queue holds
the keys of both ranks; the multi-node command line as two one-process "nodes" on this machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from conftest import TINY
from selfsup.data.loader import EpochSampler
from selfsup.engine.checkpoint import load_checkpoint

HERE = Path(__file__).parent


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent / "src"), str(HERE), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_gathers_and_shuffle_bn_across_two_ranks(tmp_path):
    result = torchrun(str(HERE / "dist_worker.py"), cwd=tmp_path)
    assert "rank 0: ok" in result.stdout and "rank 1: ok" in result.stdout


def test_ddp_moco_queue_holds_keys_from_both_ranks(tmp_path):
    words = [*TINY, "train.max_steps=2", f"train.output_dir={tmp_path}", "train.threads=1"]
    torchrun("-m", "selfsup", "train", *words, cwd=tmp_path)
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 2
    queue_ids = state["method"]["queue.ids"]  # the dataset index of every key
    ptr = state["method"]["queue.ptr"].item()
    assert ptr == 64  # 2 steps x global batch 32 (16 per rank)
    # the global batch order: rank 0 holds its first half, rank 1 the second; the queue is filled in that order
    sampler = EpochSampler(256, 32, seed=0)
    sampler.set_epoch(0)
    first_two_global_batches = [i for i, _ in list(sampler)[:64]]
    assert queue_ids[:64].tolist() == first_two_global_batches
    assert (queue_ids[64:] == -1).all()


def test_two_nodes_static_rendezvous_on_one_machine(tmp_path):
    """The README's multi-node command (--nnodes --node_rank --rdzv-endpoint), two one-process nodes here."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    words = [*TINY, "train.max_steps=2", f"train.output_dir={tmp_path}", "train.threads=1"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                f"--rdzv-endpoint=127.0.0.1:{port}"]
    nodes = [subprocess.Popen([*launcher, f"--node_rank={rank}", "-m", "selfsup", "train", *words], cwd=tmp_path,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    for node in nodes:
        out, err = node.communicate(timeout=240)
        assert node.returncode == 0, out[-3000:] + err[-3000:]
    state = load_checkpoint(tmp_path / "run")
    assert state["step"] == 2
    assert state["method"]["queue.ptr"].item() == 64  # 2 steps x global batch 32: both nodes' keys
