"""Run under torchrun with 2 processes (gloo): Sinkhorn-Knopp over row shards equals the single-process
solution, and a DDP SeLa run leaves the same, complete label table on every rank.

Usage: sela_dist_worker.py OUTPUT_DIR
"""

import sys

import torch

from conftest import tiny_config
from selfsup.engine.trainer import Trainer
from selfsup.nn import distributed
from selfsup.nn.sinkhorn import hard_labels, power_softmax, sinkhorn_knopp, sinkhorn_labels


def main() -> None:
    info = distributed.init_distributed("cpu")
    assert info.world_size == 2, info
    r = info.rank
    # sharded Sinkhorn-Knopp (uneven shards: 151 and 150 rows) == the whole problem on one process
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(301, 7, generator=generator, dtype=torch.float64)
    logits[:, 0] += 1.0
    whole, whole_result = sinkhorn_labels(logits, 25.0, tol=1e-3)
    p = power_softmax(logits[r::2], 25.0)
    result = sinkhorn_knopp(p, tol=1e-3, distributed=True)
    assert result.iterations == whole_result.iterations, (result.iterations, whole_result.iterations)
    assert torch.allclose(result.r, whole_result.r, rtol=1e-9)
    assert torch.equal(hard_labels(p, result.r), whole[r::2])

    # DDP training: both ranks embed their shard, the labels are gathered into identical tables
    cfg = tiny_config(sys.argv[1], "data.subset=100", "method.ncl=5", "method.hc=2", "method.nopts=3",
                      "train.max_steps=2", "train.batch_size=32", method="sela")
    trainer = Trainer(cfg)
    before = trainer.method.labels.clone()
    trainer.fit()
    method = trainer.method
    assert method.relabels >= 1 and not torch.equal(method.labels, before)
    tables = distributed.gather(method.labels.reshape(1, -1))
    assert torch.equal(tables[0], tables[1])
    torch.distributed.barrier()
    print(f"rank {r}: ok", flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
