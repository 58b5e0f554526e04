"""Whole networks built from the registry's operators: trained a little, frozen, converted, exported and
verified on every target that accepts them, with 0 mismatched codes; the other targets refuse them at
prepare_qat, naming the module and the operator."""
import pytest
import torch
from helpers import FILE_SUFFIXES, assert_runtime_gives_the_same_codes, require_optional_runtime
from networks import NETWORKS

import qparity as qp
from qparity.errors import UnsupportedOpError


# Lowering to ExecuTorch takes tens of seconds per network, so the suite exports one to .pte: the U-Net, whose
# nearest upsampling and concatenations of other grids go through the .pte exporter's longest paths. Every other
# network that prepare_qat accepts on executorch-xnnpack was measured with 0 mismatched codes too (docs/runtimes.md).
PTE_NETWORKS = ("small_unet",)


def train_a_little(prepared, x, steps=3):
    optimizer = torch.optim.Adam(prepared.parameters(), lr=1e-3)
    for _ in range(steps):
        loss = prepared(x).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


@pytest.mark.parametrize("target", qp.TARGETS)
@pytest.mark.parametrize("name", list(NETWORKS))
def test_network_is_bit_exact_wherever_it_is_accepted(tmp_path, name, target):
    build, shape = NETWORKS[name]
    torch.manual_seed(0)
    x = torch.randn(8, *shape)
    try:
        prepared = qp.prepare_qat(build(), (x,), target=target)
    except UnsupportedOpError as error:
        assert "cannot run on target" in str(error) and "module" in str(error), error
        return
    train_a_little(prepared, x)
    qp.freeze(prepared)
    integer = qp.convert(prepared)
    assert torch.equal(prepared.eval()(x), integer(x))
    if target in FILE_SUFFIXES:
        assert_runtime_gives_the_same_codes(integer, x, tmp_path)
    elif target == "executorch-xnnpack" and name in PTE_NETWORKS:
        require_optional_runtime("executorch", "executorch")
        qp.export(integer, tmp_path / "model.pte")
        report = qp.verify(integer, tmp_path / "model.pte", x)
        assert report.ok and report.mismatched == 0, str(report)
    elif target in ("fbgemm", "x86", "qnnpack"):  # PyTorch's engines run the converted torch.ao model
        torch.backends.quantized.engine = target
        assert torch.equal(qp.to_torch(integer)(x), integer(x))
