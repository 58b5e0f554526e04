"""Straight-through gradients: training a qparity model differentiates like torch's fake quantization."""
import pytest
import torch
from torch import nn

import qparity as qp


@pytest.mark.parametrize("target", qp.TARGETS)
def test_linear_gradients_match_torch_fake_quantize_reference(target):
    torch.manual_seed(0)
    x = torch.randn(16, 8)
    model = nn.Linear(8, 4)
    prepared = qp.prepare_qat(model, (x,), target=target, per_channel=False)
    qp.calibrate(prepared, [x * 1.5])
    qp.freeze(prepared)
    prepared.train()
    layer = next(iter(prepared.layers.values())).module
    name = prepared.graph.nodes[1].name
    in_qp, out_qp = prepared.qparams(prepared.graph.nodes[0].name), prepared.qparams(name)
    w_scale = float(next(iter(prepared.layers.values())).frozen_weight_scale)
    upstream = torch.randn(16, 4)

    (prepared(x) * upstream).sum().backward()
    ours = layer.weight.grad.clone(), layer.bias.grad.clone()
    layer.weight.grad = layer.bias.grad = None

    xq = torch.fake_quantize_per_tensor_affine(x, float(in_qp.scale), int(in_qp.zero_point), in_qp.qmin, in_qp.qmax)
    wq = torch.fake_quantize_per_tensor_affine(layer.weight, w_scale, 0, -127, 127)
    y = torch.fake_quantize_per_tensor_affine(nn.functional.linear(xq, wq, layer.bias), float(out_qp.scale),
                                              int(out_qp.zero_point), out_qp.qmin, out_qp.qmax)
    (y * upstream).sum().backward()
    torch.testing.assert_close(ours[0], layer.weight.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(ours[1], layer.bias.grad, rtol=1e-4, atol=1e-6)


def test_input_gradient_is_zero_outside_the_grid_and_one_inside():
    x = torch.linspace(-2, 2, 41).reshape(1, 41)
    prepared = qp.prepare_qat(nn.Sequential(nn.Flatten(), nn.Dropout(0.0)), (x,), target="exact")
    qp.calibrate(prepared, [x * 0.5])  # the input grid covers [-1, 1]
    qp.freeze(prepared)
    prepared.train()
    xs = x.clone().requires_grad_(True)
    prepared(xs).sum().backward()
    magnitude = xs.detach().abs()
    assert torch.all(xs.grad[magnitude > 1.05] == 0)  # saturated codes pass no gradient
    assert torch.all(xs.grad[magnitude < 0.95] == 1)  # codes = x / s + z: gradient 1 on the real scale
