"""One rank of tests/test_distributed.py: `python distributed_worker.py RANK WORLD PORT OUT`.

Every rank trains the same prepared model on its own data (ranges 1 and 50 apart), and writes what it
holds to OUT: the qparams after each step, state after training, the converted model's .qp file. Rank 0
first computes the single-process references on the concatenated batches, before joining the group.
"""
import os
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import qparity as qp

WORLD = 2
STEPS = 4
BATCH = 4  # per rank


def batches(rank: int):
    """Rank r's batches: very different ranges, so a range learned from one rank alone is visibly wrong."""
    generator = torch.Generator().manual_seed(100 + rank)
    scale, offset = (1.0, 0.0) if rank == 0 else (50.0, 20.0)
    return [torch.randn(BATCH, 3, 6, 6, generator=generator) * scale + offset for _ in range(STEPS)]


def labels(rank: int):
    generator = torch.Generator().manual_seed(200 + rank)
    return [torch.randint(0, 5, (BATCH,), generator=generator) for _ in range(STEPS)]


def concatenated(per_rank):
    return [torch.cat(step) for step in zip(*per_rank)]


def conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Flatten(),
                         nn.Linear(8 * 4 * 4, 5))


def sync_batch_norm_net() -> nn.Module:
    """Conv + SyncBatchNorm folded, a SyncBatchNorm on its own (pre-activation), a Conv1d + SyncBatchNorm."""
    torch.manual_seed(0)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, bias=False)
            self.bn = nn.SyncBatchNorm(8)
            self.pre_bn = nn.SyncBatchNorm(8)
            self.conv1d = nn.Conv1d(8, 4, 3)
            self.bn1d = nn.SyncBatchNorm(4)
            self.fc = nn.Linear(4 * 14, 5)

        def forward(self, x):
            y = torch.relu(self.bn(self.conv(x)))
            y = self.pre_bn(y).flatten(2)
            return self.fc(torch.relu(self.bn1d(self.conv1d(y))).flatten(1))

    return Net()


def observer_state(prepared):
    return {name: torch.stack([o.min_val, o.max_val]).clone() for name, o in prepared.observers.items()}


def observe_only(prepared, inputs):
    """Train-mode forwards without optimizer steps: what the observers track, step by step."""
    prepared.train()
    history = []
    with torch.no_grad():
        for x in inputs:
            prepared(x)
            history.append(observer_state(prepared))
    return history


def train(model, prepared, inputs, targets):
    """SGD steps; returns the observers' state and the first step's gradients and BatchNorm statistics."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    history, first = [], {}
    model.train()
    for step, (x, y) in enumerate(zip(inputs, targets)):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        if step == 0:
            first = {name: p.grad.clone() for name, p in prepared.named_parameters() if p.grad is not None}
            first.update({name: b.clone() for name, b in prepared.named_buffers() if "running" in name})
        optimizer.step()
        history.append(observer_state(prepared))
    return history, first


def references(out: str) -> None:
    x, y = concatenated([batches(r) for r in range(WORLD)]), concatenated([labels(r) for r in range(WORLD)])
    prepared = qp.prepare_qat(conv_net(), (x[0],), target="tflite")
    observed = observe_only(prepared, x)
    prepared = qp.prepare_qat(sync_batch_norm_net(), (x[0],), target="tflite")
    _, first = train(prepared, prepared, x, y)
    torch.save({"observed": observed, "first_step": first}, os.path.join(out, "single.pt"))


def distributed_runs(rank: int, out: str) -> None:
    x, y = batches(rank), labels(rank)
    results = {}
    prepared = qp.prepare_qat(conv_net(), (x[0],), target="tflite")
    results["observed"] = observe_only(prepared, x)
    for broadcast_buffers in (True, False):
        prepared = qp.prepare_qat(sync_batch_norm_net(), (x[0],), target="tflite")
        ddp = DistributedDataParallel(prepared, broadcast_buffers=broadcast_buffers)
        history, first = train(ddp, prepared, x, y)
        results[f"ddp_broadcast_{broadcast_buffers}"] = {"history": history, "first_step": first}
        qp.freeze(prepared)
        qp.convert(prepared).save(os.path.join(out, f"rank{rank}_broadcast_{broadcast_buffers}.qp"))
    results["fsdp"] = fsdp_run(rank, out, x, y)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))


def fsdp_run(rank: int, out: str, x, y) -> dict:
    """FSDP2 shards the parameters (not the observers' buffers); freeze refuses the sharded model, and the
    gathered full state dict, loaded into a model prepared the same way, freezes and converts."""
    prepared = qp.prepare_qat(sync_batch_norm_net(), (x[0],), target="tflite")
    fully_shard(prepared)
    history, _ = train(prepared, prepared, x, y)
    try:
        qp.freeze(prepared)
        refusal = ""
    except qp.QParityError as error:
        refusal = str(error)
    whole = qp.prepare_qat(sync_batch_norm_net(), (x[0],), target="tflite")
    whole.load_state_dict(get_model_state_dict(prepared, options=StateDictOptions(full_state_dict=True)))
    qp.freeze(whole)
    qp.convert(whole).save(os.path.join(out, f"rank{rank}_fsdp.qp"))
    return {"history": history, "refusal": refusal}


def main() -> None:
    rank, world, port, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    torch.set_num_threads(1)
    # torch 2.14 renames broadcast_buffers; its False (no sync at construction either) is the stricter case.
    warnings.filterwarnings("ignore", message="`broadcast_buffers` is deprecated", category=FutureWarning)
    if rank == 0:
        references(out)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        distributed_runs(rank, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
