"""The motivating case, with qparity and with torch.ao side by side.

A Conv2d(3, 3, 1x1) + ReLU with weights k * I and zero bias sees input codes 0..255 (x = q / 255); the
expected output is the identity on codes. torch.ao's QAT model (fused fake quant, the default qconfigs)
gives 0..255 in fake quant but 0..127, 127, 128, ..., 254 once converted: it trained one weight grid and
deploys another. qparity's fake-quant forward *is* the integer program, so the two cannot differ.

Run: python examples/seed_conv1x1.py   (a few seconds on a CPU)
"""
import warnings
from fractions import Fraction

import torch
import torch.ao.quantization as tq
from torch import nn

import qparity

KS = (1.0, 0.5, 2.0)
AROUND = slice(124, 132)  # input codes 124..131, where torch.ao's converted model drops a code


def identity_conv(k: float) -> nn.Module:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(k * torch.eye(3).reshape(3, 3, 1, 1))
        model[0].bias.zero_()
    return model


def ramp() -> torch.Tensor:
    """Every input code 0..255 once per channel: x = q / 255, shape [1, 3, 1, 256]."""
    return (torch.arange(256, dtype=torch.float32) / 255.0).repeat(1, 3, 1, 1)


# -- qparity ------------------------------------------------------------------------------------------------
def qparity_case(k: float, target: str):
    """Calibrate on the ramp (observers take its exact min/max), then freeze."""
    x = ramp()
    qm = qparity.prepare_qat(identity_conv(k), (x,), target=target)
    qparity.calibrate(qm, [x])
    qparity.freeze(qm)
    im = qparity.convert(qm)
    with torch.no_grad():
        fake = qm.eval()(x)
    integer = im(x)
    return x, fake, integer, im


def centered_codes(values: torch.Tensor, qp: qparity.QParams) -> torch.Tensor:
    """Output reals back to codes minus the zero point (exact: the reals are (q - z) * s in float32)."""
    return torch.round(values / qp.scale).to(torch.int64)


def report_qparity() -> int:
    print("=" * 100)
    print("qparity: prepare_qat -> calibrate on the ramp -> freeze -> convert")
    print("=" * 100)
    total_mismatched = 0
    for k in KS:
        for target in qparity.TARGETS:
            x, fake, integer, im = qparity_case(k, target)
            mismatched = int((fake != integer).sum())
            total_mismatched += mismatched
            out_qp = im.output_qparams
            in_qp = im.input_qparams[0]
            fake_codes = centered_codes(fake, out_qp)[0, 0, 0]
            int_codes = centered_codes(integer, out_qp)[0, 0, 0]
            in_codes = (im.quantize(x).to(torch.int64) - int(in_qp.zero_point))[0, 0, 0]
            identity = torch.equal(int_codes, in_codes)
            print(f"k={k:<4} target={target:<12} fake-quant vs integer: {mismatched} mismatched of "
                  f"{fake.numel()} output values; output codes == input codes: {identity}")
            print(f"    q - z, inputs 124..131: fake-quant {fake_codes[AROUND].tolist()}  "
                  f"integer {int_codes[AROUND].tolist()}")
        layer = next(iter(im.layers.values()))
        scale = layer.weight_scale.reshape(-1)[0]
        code = int(layer.weight_codes.reshape(3, 3)[0, 0])
        value = (code * scale).item()
        exact_error = float(code * Fraction(scale.item()) / Fraction(k) - 1)
        print(f"    weight grid for k={k}: symmetric, scale = f32(k / 127) = {scale.item():.9g}, the code of k is "
              f"{code}, dequantized {code} * scale = {value!r} ({'exactly k' if value == k else 'not k'} in float32; "
              f"in exact arithmetic k * (1 {exact_error:+.2g})); the same grid in training and deployment")
    print(f"qparity total: {total_mismatched} mismatched output values across {len(KS)} values of k and "
          f"{len(qparity.TARGETS)} targets")
    return total_mismatched


# -- torch.ao, for contrast (the builder of /work/shared/cases/seed_conv1x1.py, copied to stay self-contained)
def qconfig():
    act = tq.FusedMovingAvgObsFakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver, quant_min=0, quant_max=255, reduce_range=False)
    wgt = tq.FusedMovingAvgObsFakeQuantize.with_args(
        observer=tq.MovingAverageMinMaxObserver, quant_min=-128, quant_max=127,
        dtype=torch.qint8, qscheme=torch.per_tensor_symmetric)
    return tq.QConfig(activation=act, weight=wgt)


class Conv1x1(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.quant = tq.QuantStub(qconfig())
        self.conv = nn.Conv2d(3, 3, 1)
        self.act = nn.ReLU()
        self.dequant = tq.DeQuantStub()
        self.qconfig = qconfig()
        with torch.no_grad():
            self.conv.weight.copy_(k * torch.eye(3).reshape(3, 3, 1, 1))
            self.conv.bias.zero_()

    def forward(self, x):
        return self.dequant(self.act(self.conv(self.quant(x))))


def _set(fq, scale, lo, hi):
    fq.scale = torch.tensor([scale])
    obs = fq.activation_post_process
    obs.min_val, obs.max_val = torch.tensor(lo), torch.tensor(hi)


def build(k=1.0, engine="fbgemm"):
    warnings.simplefilter("ignore")
    torch.backends.quantized.engine = engine
    m = Conv1x1(k)
    tq.fuse_modules(m, [["conv", "act"]], inplace=True)
    prepared = tq.prepare_qat(m.train())
    prepared.apply(tq.disable_observer).eval()
    # The user's hand-set, "analytical" quantization parameters.
    _set(prepared.conv.weight_fake_quant, 2 * k / 255, 0.0, k)
    _set(prepared.conv.activation_post_process, k / 255, 0.0, k)
    _set(prepared.quant.activation_post_process, 1 / 255, 0.0, 1.0)
    converted = tq.convert(prepared, inplace=False)
    x = (torch.arange(256).repeat(1, 3, 256, 1) / 255.0,)
    return prepared, converted, x


def report_torch_ao() -> int:
    print()
    print("=" * 100)
    print("torch.ao, for contrast: FusedMovingAvgObsFakeQuantize qconfig, prepare_qat -> convert")
    print("=" * 100)
    engines = [e for e in ("fbgemm", "x86", "onednn", "qnnpack") if e in torch.backends.quantized.supported_engines]
    total_mismatched = 0
    for k in KS:
        for engine in engines:
            prepared, converted, (x,) = build(k, engine)
            with torch.no_grad():
                fake = torch.round(prepared(x) / (k / 255)).to(torch.int64)
                real = torch.round(converted(x) / (k / 255)).to(torch.int64)
            mismatched = int((fake != real).sum())
            total_mismatched += mismatched
            print(f"k={k:<4} engine={engine:<8} fake-quant vs converted: {mismatched} mismatched of {fake.numel()} "
                  f"output values")
            if engine == engines[0]:
                print(f"    codes, inputs 124..131: fake-quant {fake[0, 0, 0, AROUND].tolist()}  "
                      f"converted {real[0, 0, 0, AROUND].tolist()}")
        fq = prepared.conv.weight_fake_quant
        trained_scale, trained_zp = fq.scale.item(), int(fq.zero_point.item())
        weight = converted.conv.weight()
        print(f"    weight grid for k={k}: trained on scale {trained_scale:.9g}, zero point {trained_zp} (the code "
              f"of k is {round(k / trained_scale) + trained_zp}, value k); deployed on scale {weight.q_scale():.9g}, "
              f"zero point {weight.q_zero_point()} (the code of k is {int(weight.int_repr()[0, 0])}, value "
              f"{weight.dequantize()[0, 0].item():.9g})")
    print(f"torch.ao total: {total_mismatched} mismatched output values")
    return total_mismatched


EXPLANATION = """
Why they differ
- qparity: the weight grid is symmetric with scale f32(k / 127) in training and after convert, because
  both read it through the same function. The code of k is 127 and 127 * scale is k in float32 (a few
  parts in 10^9 below k in exact arithmetic, far from any rounding tie), so the conv is the identity on
  codes. The fake-quant forward calls the integer program's own requantization, so fake-quant and integer
  outputs are equal bit for bit for every target.
- torch.ao: the fused fake quant ignores the scale set by hand and recomputes its grid from the observer's
  min/max (0, k) on every forward. Its symmetric int8 rule, max(|min| / 128, max / 127), is skipped when
  min == 0, so training runs on the affine grid scale k / 255, zero point -128, where k is exactly
  representable. convert recomputes the grid as max(|min|, max) / 127.5 = 2k / 255, zero point 0: k / scale
  is 127.5, which clamps to 127, so the deployed weight is 254k / 255. Every output code q >= 128 becomes
  round(q * 254 / 255), one code lower: 0..127, 127, 128, ..., 254. Trained on one grid, deployed on another.
"""


def report_doctor() -> None:
    """What `qparity.doctor` says about the torch.ao model (k = 1, fbgemm): the verdict and its causes."""
    print("=" * 100)
    print("qparity.doctor(prepared, converted, example_inputs) on the torch.ao model, k=1.0, fbgemm")
    print("=" * 100)
    prepared, converted, inputs = build(1.0, "fbgemm")
    print(qparity.doctor(prepared, converted, inputs))


if __name__ == "__main__":
    qparity_mismatched = report_qparity()
    report_torch_ao()
    print(EXPLANATION)
    report_doctor()
    print(f"qparity mismatches: {qparity_mismatched}")
