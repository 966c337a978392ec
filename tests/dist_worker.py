"""Run under torchrun with 2 processes (gloo): checks the gathers that the queue and ShuffleBN rely on."""

import torch
import torch.distributed as dist

from selfsup.nn import distributed
from selfsup.nn.memory import MemoryBank


def main() -> None:
    info = distributed.init_distributed("cpu")
    assert info.world_size == 2, info
    r = info.rank
    # gather concatenates in rank order
    got = distributed.gather(torch.full((3, 2), float(r)))
    assert got[:, 0].tolist() == [0, 0, 0, 1, 1, 1], got
    # every rank's bank receives both ranks' keys, in rank order, and stays identical
    bank = MemoryBank(12, 2, store_ids=True)
    bank.enqueue(torch.full((3, 2), 10.0 + r), torch.full((3,), r))
    assert bank.bank[:6, 0].tolist() == [10, 10, 10, 11, 11, 11], bank.bank
    assert bank.ids[:6].tolist() == [0, 0, 0, 1, 1, 1]
    assert bank.ptr.item() == 6
    # uneven shards (3 rows here, 1 there) are gathered whole, in rank order
    uneven = distributed.gather_uneven(torch.full((3 - 2 * r,), float(r)))
    assert uneven.tolist() == [0, 0, 0, 1], uneven
    # ShuffleBN: the shuffled slices partition the global batch and unshuffle restores each rank's rows
    torch.manual_seed(100 + r)  # different local RNGs: the permutation must still agree (broadcast)
    x = torch.arange(4, dtype=torch.float32).unsqueeze(1) + 4 * r
    shuffled, inverse = distributed.batch_shuffle(x)
    pieces = distributed.gather(shuffled)
    assert sorted(pieces[:, 0].tolist()) == list(range(8)), pieces
    assert torch.equal(distributed.batch_unshuffle(shuffled, inverse), x)
    # SyncBatchNorm has no CPU path in this torch: why train.sync_bn=true is a ConfigError for CPU processes
    try:
        torch.nn.SyncBatchNorm(2).train()(torch.randn(4, 2, 3, 3))
    except ValueError as error:
        assert "SyncBatchNorm" in str(error), error
    else:
        raise AssertionError("SyncBatchNorm ran on CPU: train.sync_bn could be allowed there (see Trainer)")
    dist.barrier()
    print(f"rank {r}: ok", flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
