"""A model's forward and an IntegerModel's run drop each node's value after its last use (their peak memory);
the doctor, golden vectors and exporters keep every value. Dropping never changes a result."""
import pytest
import torch

import qparity as qp
from helpers import prepare_and_convert
from networks import NETWORKS
from qparity.graph import collect_refs, last_uses
from qparity.ops.program import ProgramExecutor


def readers(graph):
    """Per value, the positions of the nodes that read it."""
    found = {}
    for position, node in enumerate(graph.nodes):
        refs = []
        collect_refs((node.args, node.kwargs), refs)
        for name in refs:
            found.setdefault(name, []).append(position)
    return found


@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_each_value_is_released_once_after_its_last_reader_and_outputs_never(network):
    cls, shape = NETWORKS[network]
    torch.manual_seed(0)
    graph = qp.prepare_qat(cls(), (torch.randn(2, *shape),), target="tflite").graph
    released = last_uses(graph)
    position = {node.name: i for i, node in enumerate(graph.nodes)}
    outputs = []
    collect_refs(graph.output, outputs)
    dropped = [name for names in released.values() for name in names]
    assert sorted(dropped) == sorted(n.name for n in graph.nodes if n.name not in outputs)
    read_at = readers(graph)
    for reader, names in released.items():
        for name in names:
            assert position[reader] == max(read_at.get(name, [position[name]]))


@pytest.mark.parametrize("target", ["tflite", "x86", "qnnpack"])
def test_a_run_that_drops_values_gives_the_same_codes_and_keeps_only_the_outputs(target):
    cls, shape = NETWORKS["small_unet"]
    torch.manual_seed(1)
    batches = [torch.randn(2, *shape) for _ in range(2)]
    _, integer = prepare_and_convert(cls(), (batches[0],), target, batches)
    codes = integer.quantize(batches[1]).to(torch.int64)
    keeping = integer.executor()
    expected = keeping.run([codes])
    dropping = ProgramExecutor(integer.graph, integer.target, integer._integer_mode, keep_values=False)
    got = dropping.run([codes])
    assert torch.equal(got.codes, expected.codes)
    outputs = []
    collect_refs(integer.graph.output, outputs)
    assert set(dropping.values) == set(outputs) and len(keeping.values) == len(integer.graph.nodes)
    # IntegerModel.run drops values too (on PyTorch's engine for x86 and qnnpack: engine_program._run_nodes)
    assert torch.equal(integer.run(integer.quantize(batches[1])).to(torch.int64), expected.codes)


def test_capture_leaves_no_example_activation_alive_for_the_garbage_collector():
    import gc

    from qparity.bench import ResNetish

    torch.manual_seed(2)
    x = torch.randn(8, 3, 16, 16)
    activation_size = 8 * 16 * 16 * 16

    def large_tensors():
        return {id(o): o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.numel() >= activation_size}

    gc.collect()
    gc.disable()
    try:
        before = large_tensors()  # what earlier tests left: not this capture's
        model = qp.prepare_qat(ResNetish((16, 32), in_channels=3), (x,), target="tflite")
        alive = [o for i, o in large_tensors().items() if i not in before]
    finally:
        gc.enable()
    assert model is not None and not alive, f"{len(alive)} example activations kept alive after capture"
