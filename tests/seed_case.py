"""The motivating case (shared/cases/seed_conv1x1.py), the project's own copy for the tests.

A fused Conv2d(3, 3, 1x1) + ReLU with weights k*I and hand-set "analytical" qparams: torch.ao's fake-quant
output codes are 0..255, its converted model's 0..127, 127, 128, ..., 254.
"""
import torch
import torch.ao.quantization as tq
from torch import nn


def seed_qconfig(fused=True):
    fake_quant = tq.FusedMovingAvgObsFakeQuantize if fused else tq.FakeQuantize
    act = fake_quant.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255,
                               reduce_range=False)
    wgt = fake_quant.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=-128, quant_max=127,
                               dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return tq.QConfig(activation=act, weight=wgt)


class Conv1x1(nn.Module):
    def __init__(self, k, fused=True):
        super().__init__()
        self.quant = tq.QuantStub(seed_qconfig(fused))
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU()
        self.dequant = tq.DeQuantStub()
        self.qconfig = seed_qconfig(fused)
        with torch.no_grad():
            self.conv.weight.copy_(k * torch.eye(3).reshape(3, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.dequant(self.act(self.conv(self.quant(x))))


def _set(fq, scale, lo, hi):
    fq.scale = torch.tensor([scale])
    obs = fq.activation_post_process
    obs.min_val, obs.max_val = torch.tensor(lo), torch.tensor(hi)


def build_seed(k=1.0, engine="fbgemm"):
    torch.backends.quantized.engine = engine
    m = Conv1x1(k)
    tq.fuse_modules(m, [["conv", "act"]], inplace=True)
    prepared = tq.prepare_qat(m.train())
    prepared.apply(tq.disable_observer).eval()
    _set(prepared.conv.weight_fake_quant, 2 * k / 255, 0.0, k)
    _set(prepared.conv.activation_post_process, k / 255, 0.0, k)
    _set(prepared.quant.activation_post_process, 1 / 255, 0.0, 1.0)
    converted = tq.convert(prepared, inplace=False)
    x = (torch.arange(256).repeat(1, 3, 256, 1) / 255.0,)
    return prepared, converted, x
