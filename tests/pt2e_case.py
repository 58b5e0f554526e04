"""A torchao PT2E QAT flow for the doctor's tests: conv+BN+ReLU, a residual add, a mean and a linear, prepared
with ExecuTorch's XNNPACKQuantizer (per-channel QAT config) or torchao's X86InductorQuantizer, trained a few
steps, then observers disabled, moved to eval and converted with convert_pt2e."""
import copy
import dataclasses

import torch
from torch import nn


class ResidualNet(nn.Module):
    def __init__(self, batch_norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8) if batch_norm else nn.Identity()
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        y = self.relu(self.bn(self.conv(x)))
        y = y + self.conv2(y)
        return self.fc(y.mean((2, 3)))


class PoolNet(nn.Module):
    """conv+ReLU -> max pool -> conv+ReLU -> max pool: XNNPACKQuantizer quantizes every edge of it;
    X86InductorQuantizer quantizes only the first pool's output (the second conv's input)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)

    def forward(self, x):
        y = torch.max_pool2d(torch.relu(self.conv(x)), 2)
        return torch.max_pool2d(torch.relu(self.conv2(y)), 2)


class X86Net(nn.Module):
    """What X86InductorQuantizer leaves in float32: conv+BN+ReLU -> max pool (quantized), a conv and an average
    pool joined by cat, a channel slice, a conv whose output meets the pool's in a float cat, adaptive average
    pool + flatten (quantized for the linear), and the linear's float model output."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        y = torch.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        z = torch.cat([self.conv2(y), nn.functional.avg_pool2d(y, 3, 1, 1)], 1)
        z = self.conv3(z[:, 2:6])
        z = nn.functional.adaptive_avg_pool2d(torch.cat([z, y], 1), 1)
        return self.fc(torch.flatten(z, 1))


def xnnpack_quantizer(fused: bool = True, per_channel: bool = True):
    """The default per-channel QAT config; fused=False swaps every FusedMovingAvgObsFakeQuantize for a
    FakeQuantize with the same moving-average observer (the doctor's fix)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (XNNPACKQuantizer,
                                                                          get_symmetric_quantization_config)
    from torchao.quantization.pt2e import (FakeQuantize, MovingAverageMinMaxObserver,
                                           MovingAveragePerChannelMinMaxObserver)

    config = get_symmetric_quantization_config(is_per_channel=per_channel, is_qat=True)
    if not fused:
        act = dataclasses.replace(config.input_activation, observer_or_fake_quant_ctr=FakeQuantize.with_args(
            observer=MovingAverageMinMaxObserver, eps=2 ** -12))
        weight = dataclasses.replace(config.weight, observer_or_fake_quant_ctr=FakeQuantize.with_args(
            observer=MovingAveragePerChannelMinMaxObserver, eps=2 ** -12))
        config = dataclasses.replace(config, input_activation=act, output_activation=act, weight=weight)
    return XNNPACKQuantizer().set_global(config)


def x86_quantizer():
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86

    return x86.X86InductorQuantizer().set_global(x86.get_default_x86_inductor_quantization_config(is_qat=True))


def build_pt2e(quantizer=None, seed: int = 0, batch_norm: bool = True, model: nn.Module = None):
    """(prepared, converted, example_inputs), observers disabled and BN in eval mode before convert_pt2e.
    convert_pt2e's conv+BN folding costs about 20 s of CPU (it exports its patterns), so use BN sparingly."""
    import torchao.quantization.pt2e as pt2e
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_qat_pt2e

    torch.manual_seed(seed)
    x = torch.randn(2, 3, 12, 12)
    model = model or ResidualNet(batch_norm)
    prepared = prepare_qat_pt2e(torch.export.export(model, (x,)).module(), quantizer or xnnpack_quantizer())
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(2):
        loss = prepared(torch.randn(2, 3, 12, 12)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    prepared.apply(pt2e.disable_observer)
    pt2e.move_exported_model_to_eval(prepared)
    converted = convert_pt2e(copy.deepcopy(prepared))
    return prepared, converted, (x,)
