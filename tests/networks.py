"""Small versions of the networks real vision, mobile and audio models are built from (the operator registry's
acceptance set): the same blocks and operators, few channels, so the tests stay fast."""
import torch
import torch.nn.functional as F
from torch import nn


def conv_bn(cin, cout, kernel, stride=1, groups=1, act=None):
    layers = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return nn.Sequential(*layers, act) if act is not None else nn.Sequential(*layers)


class SqueezeExcite(nn.Module):
    def __init__(self, channels, squeezed, gate):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.reduce = nn.Conv2d(channels, squeezed, 1)
        self.expand = nn.Conv2d(squeezed, channels, 1)
        self.gate = gate

    def forward(self, x):
        return x * self.gate(self.expand(F.relu(self.reduce(self.pool(x)))))


class InvertedResidual(nn.Module):
    def __init__(self, cin, expanded, cout, kernel, stride, act, se_gate=None):
        super().__init__()
        self.expand = conv_bn(cin, expanded, 1, act=act())
        self.depthwise = conv_bn(expanded, expanded, kernel, stride, groups=expanded, act=act())
        self.se = SqueezeExcite(expanded, max(4, expanded // 4), se_gate()) if se_gate else nn.Identity()
        self.project = conv_bn(expanded, cout, 1)
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3Small(nn.Module):
    """Hardswish, depthwise inverted residuals, squeeze-excite with a sigmoid gate."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2, act=nn.Hardswish())
        self.blocks = nn.Sequential(InvertedResidual(8, 16, 8, 3, 1, nn.ReLU, nn.Sigmoid),
                                    InvertedResidual(8, 24, 12, 5, 2, nn.Hardswish, nn.Sigmoid),
                                    InvertedResidual(12, 24, 12, 3, 1, nn.Hardswish))
        self.head = conv_bn(12, 24, 1, act=nn.Hardswish())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(24, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.head(self.blocks(self.stem(x)))), 1))


class EfficientNetB0Like(nn.Module):
    """SiLU everywhere, MBConv blocks with squeeze-excite (sigmoid gate, SiLU inside)."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = conv_bn(3, 8, 3, 2, act=nn.SiLU())
        self.blocks = nn.Sequential(InvertedResidual(8, 16, 8, 3, 1, nn.SiLU, nn.Sigmoid),
                                    InvertedResidual(8, 32, 16, 5, 2, nn.SiLU, nn.Sigmoid))
        self.head = conv_bn(16, 32, 1, act=nn.SiLU())
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        return self.fc(self.head(self.blocks(self.stem(x))).mean((2, 3)))


class SmallUNet(nn.Module):
    """Encoder-decoder with nearest upsampling and skip concatenations."""

    def __init__(self):
        super().__init__()
        self.enc1 = conv_bn(3, 8, 3, act=nn.ReLU())
        self.enc2 = conv_bn(8, 16, 3, 2, act=nn.ReLU())
        self.bottom = conv_bn(16, 16, 3, 2, act=nn.ReLU())
        self.up = nn.Upsample(scale_factor=2, mode="nearest")
        self.dec2 = conv_bn(32, 8, 3, act=nn.ReLU())
        self.dec1 = conv_bn(16, 8, 3, act=nn.ReLU())
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        e1 = self.enc1(x)
        e2 = self.enc2(e1)
        d2 = self.dec2(torch.cat([self.up(self.bottom(e2)), e2], 1))
        d1 = self.dec1(torch.cat([F.interpolate(d2, scale_factor=2, mode="nearest"), e1], 1))
        return self.out(d1)


class DSCNNKeywordSpotter(nn.Module):
    """Depthwise-separable CNN on a spectrogram [N, 1, time, mel] (DS-CNN, Hello Edge)."""

    def __init__(self, classes=6):
        super().__init__()
        self.stem = conv_bn(1, 16, 3, 2, act=nn.ReLU())
        self.blocks = nn.Sequential(*[nn.Sequential(conv_bn(16, 16, 3, groups=16, act=nn.ReLU()),
                                                    conv_bn(16, 16, 1, act=nn.ReLU())) for _ in range(2)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class TemporalConvNet(nn.Module):
    """1-D convolutions with BatchNorm1d, dilation, a residual, LeakyReLU, pools and a temporal mean."""

    def __init__(self, channels=4, classes=3):
        super().__init__()
        self.c1 = nn.Conv1d(channels, 16, 5, padding=2, bias=False)
        self.bn1 = nn.BatchNorm1d(16)
        self.c2 = nn.Conv1d(16, 16, 3, padding=2, dilation=2, bias=False)
        self.bn2 = nn.BatchNorm1d(16)
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool1d(2)
        self.fc = nn.Linear(16, classes)

    def forward(self, x):
        y = F.relu(self.bn1(self.c1(x)))
        y = self.act(self.bn2(self.c2(y)) + y)
        return self.fc(self.pool(y).mean(-1))


class PreActResNet(nn.Module):
    """Pre-activation residual blocks (BatchNorm and ReLU before each conv, BatchNorm not after a conv), and an
    MLP head with BatchNorm1d after a Linear."""

    def __init__(self, classes=4):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.ModuleList(nn.ModuleDict({"bn1": nn.BatchNorm2d(8), "conv1": nn.Conv2d(8, 8, 3, padding=1),
                                                   "bn2": nn.BatchNorm2d(8), "conv2": nn.Conv2d(8, 8, 3, padding=1)})
                                    for _ in range(2))
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 8)
        self.bn_fc = nn.BatchNorm1d(8)
        self.out = nn.Linear(8, classes)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            y = block["conv1"](F.relu(block["bn1"](x)))
            x = x + block["conv2"](F.relu(block["bn2"](y)))
        x = F.relu(self.bn(x)).mean((2, 3))
        return self.out(F.relu(self.bn_fc(self.fc(x))))


NETWORKS = {
    "preact_resnet": (PreActResNet, (3, 12, 12)),
    "mobilenetv3_small": (MobileNetV3Small, (3, 32, 32)),
    "efficientnet_b0_like": (EfficientNetB0Like, (3, 32, 32)),
    "small_unet": (SmallUNet, (3, 16, 16)),
    "ds_cnn_keyword_spotter": (DSCNNKeywordSpotter, (1, 20, 10)),
    "temporal_conv_net": (TemporalConvNet, (4, 32)),
}
