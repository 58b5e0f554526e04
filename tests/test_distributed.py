"""Distributed QAT: two gloo ranks on 127.0.0.1 with very different data (tests/distributed_worker.py).

The claims: every rank holds the same qparams at every step; two ranks track exactly the ranges one process
tracks on the concatenated batch; a SyncBatchNorm normalizes over both ranks' batch, as BatchNorm does on
the concatenated batch; freeze + convert give byte-identical .qp files on every rank, inside
DistributedDataParallel with and without its buffer broadcast, and after FSDP2 via a gathered state dict.
"""
import os
import pathlib
import socket
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist
from torch import nn

import qparity as qp
from helpers import assert_bit_exact, calibrate, prepare_and_convert

WORKER = pathlib.Path(__file__).with_name("distributed_worker.py")
SOURCE = pathlib.Path(__file__).resolve().parents[1] / "src"
TIMEOUT_S = 120  # the ranks take seconds; a hung collective must fail the test, not hang the suite


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run both ranks once; when one fails or TIMEOUT_S passes, kill the other (it would wait on a collective
    forever). Returns (rank 0's results, rank 1's, the single-process references, the output folder)."""
    out = tmp_path_factory.mktemp("distributed")
    env = {**os.environ, "PYTHONPATH": str(SOURCE), "OMP_NUM_THREADS": "1"}
    if sys.platform.startswith("linux"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")  # the loopback, whatever the host name resolves to
    port = str(free_port())
    logs = [open(out / f"rank{rank}.log", "w+") for rank in range(2)]
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(rank), "2", port, str(out)], env=env,
                              stdout=log, stderr=subprocess.STDOUT) for rank, log in enumerate(logs)]
    deadline = time.monotonic() + TIMEOUT_S
    while None in (codes := [p.poll() for p in procs]):
        if time.monotonic() > deadline or any(code not in (None, 0) for code in codes):
            for p in procs:
                p.kill()
                p.wait()
            break
        time.sleep(0.05)
    if any(p.returncode != 0 for p in procs):
        report = []
        for rank, (p, log) in enumerate(zip(procs, logs)):
            log.seek(0)
            status = "killed" if p.returncode < 0 else f"exit code {p.returncode}"
            report.append(f"rank {rank} ({status}):\n{log.read()[-3000:]}")
        pytest.fail("\n".join(report))
    for log in logs:
        log.close()
    load = lambda name: torch.load(out / name, weights_only=True)  # noqa: E731
    return load("rank0.pt"), load("rank1.pt"), load("single.pt"), out


def histories(results):
    yield "observers only", results["observed"]
    for broadcast in (True, False):
        yield f"DDP broadcast_buffers={broadcast}", results[f"ddp_broadcast_{broadcast}"]["history"]
    yield "FSDP", results["fsdp"]["history"]


def test_every_rank_holds_the_same_observer_ranges_at_every_step(ranks):
    (run, a), (_, b) = zip(*histories(ranks[0])), zip(*histories(ranks[1]))
    for name, steps_a, steps_b in zip(run, a, b):
        for step, (state_a, state_b) in enumerate(zip(steps_a, steps_b)):
            for observer in state_a:
                assert torch.equal(state_a[observer], state_b[observer]), f"{name}, step {step}, {observer}"


def test_two_ranks_track_the_ranges_one_process_tracks_on_the_concatenated_batch(ranks):
    two_ranks, single = ranks[0]["observed"], ranks[2]["observed"]
    for step, (state, expected) in enumerate(zip(two_ranks, single)):
        for observer in expected:
            assert torch.equal(state[observer], expected[observer]), f"step {step}, {observer}"
    # rank 1's data spans about [-110, 160]; a range from rank 0 alone (about [-3, 3]) would fail above.
    assert float(two_ranks[0]["input_1"][1]) > 100


@pytest.mark.parametrize("run", ["broadcast_True", "broadcast_False", "fsdp"])
def test_freeze_and_convert_give_byte_identical_qp_files_on_every_rank(ranks, run):
    out = ranks[3]
    files = [(out / f"rank{rank}_{run}.qp").read_bytes() for rank in range(2)]
    assert files[0] == files[1]


def test_freeze_refuses_parameters_that_fsdp_sharded_and_says_how_to_gather_them(ranks):
    refusal = ranks[0]["fsdp"]["refusal"]
    assert "freeze needs whole parameters" in refusal and "full_state_dict=True" in refusal


@pytest.mark.parametrize("broadcast_buffers", [True, False])
def test_sync_batch_norm_over_two_ranks_is_batch_norm_on_the_concatenated_batch(ranks, broadcast_buffers):
    """The first step's gradients and BatchNorm statistics. Float sums in another order, so equal to a few
    ulps, not bit for bit: the exact claims are the ranges and the files above."""
    two_ranks = ranks[0][f"ddp_broadcast_{broadcast_buffers}"]["first_step"]
    other_rank = ranks[1][f"ddp_broadcast_{broadcast_buffers}"]["first_step"]
    single = ranks[2]["first_step"]
    assert two_ranks.keys() == single.keys() and any("running_var" in k for k in single)
    for name, expected in single.items():
        assert torch.equal(two_ranks[name], other_rank[name]), name
        torch.testing.assert_close(two_ranks[name], expected, rtol=1e-5, atol=1e-6, msg=name)


def test_freeze_of_a_wrapper_names_its_module():
    wrapper = nn.Module()
    wrapper.module = qp.prepare_qat(nn.Linear(3, 2), (torch.randn(2, 3),))
    with pytest.raises(qp.QParityError, match=r"got Module \(a wrapper such as DistributedDataParallel: pass its"):
        qp.freeze(wrapper)


def conv_bn_net(batch_norm) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), batch_norm(8), nn.ReLU(), nn.Conv2d(8, 4, 3),
                         batch_norm(4), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))


def test_sync_batch_norm_folds_as_batch_norm_does_without_torch_distributed():
    torch.manual_seed(1)
    batches = [torch.randn(4, 3, 6, 6) * 3 for _ in range(3)]
    models = [prepare_and_convert(conv_bn_net(bn), (batches[0],), "tflite", batches, lr=0.05)
              for bn in (nn.BatchNorm2d, nn.SyncBatchNorm)]
    (plain, plain_integer), (synced, synced_integer) = models
    assert_bit_exact(synced, synced_integer, batches[0])
    assert torch.equal(synced_integer(batches[0]), plain_integer(batches[0]))


def test_sync_batch_norm_after_conv1d_folds_into_it():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv1d(3, 6, 3), nn.SyncBatchNorm(6), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 6, 2))
    batches = [torch.randn(4, 3, 8) for _ in range(3)]
    prepared, integer = prepare_and_convert(model, (batches[0],), "exact", batches, lr=0.05)
    assert len(prepared.layers) == 2  # conv1d with its BatchNorm, linear: no BatchNorm layer of its own
    assert_bit_exact(prepared, integer, batches[0])


def test_observers_and_batch_norm_call_no_collective_when_torch_distributed_is_not_initialized(monkeypatch):
    def no_collective(*args, **kwargs):
        raise AssertionError("a collective ran outside torch.distributed")

    monkeypatch.setattr(dist, "all_reduce", no_collective)
    prepared = qp.prepare_qat(conv_bn_net(nn.SyncBatchNorm), (torch.randn(2, 3, 6, 6),), target="exact")
    calibrate(prepared, [torch.randn(4, 3, 6, 6)], lr=0.01)
    assert all(o.calibrated for o in prepared.observers.values())
