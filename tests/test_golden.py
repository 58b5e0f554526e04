"""Golden vectors are enough to rebuild the network: a small NumPy interpreter reading only the golden files
(index.json and .npy) reproduces every node's codes and the model's outputs bit for bit.

The interpreter below deliberately does not import qparity: the integer arithmetic (gemmlowp's
SaturatingRoundingDoublingHighMul and RoundingDivideByPOT, round half away/even, float32 fused
multiply-add) is written again from the C definitions with Python integers, as a firmware engineer would.
"""
import json
import math
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qparity as qp
from qparity.golden import golden

# ---------------------------------------------------------------------------------------------------------
# Scalar arithmetic, Python integers (tensorflow/lite/kernels/internal/common.h, gemmlowp/fixedpoint.h)
# ---------------------------------------------------------------------------------------------------------
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1


def srdhm(a: int, b: int) -> int:
    """SaturatingRoundingDoublingHighMul on int32 values."""
    if a == b == INT32_MIN:
        return INT32_MAX
    ab = a * b
    nudge = (1 << 30) if ab >= 0 else 1 - (1 << 30)
    total = ab + nudge
    quotient = abs(total) // (1 << 31)  # C division truncates toward zero
    return quotient if total >= 0 else -quotient


def rounding_divide_by_pot(x: int, exponent: int) -> int:
    mask = (1 << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (1 if x < 0 else 0)
    return (x >> exponent) + (1 if remainder > threshold else 0)


def multiply_by_quantized_multiplier(x: int, multiplier: int, shift: int) -> int:
    left, right = max(shift, 0), max(-shift, 0)
    return rounding_divide_by_pot(srdhm(x * (1 << left), multiplier), right)


def apply_scale_32(value: int, multiplier: int, shift: int) -> int:
    """TOSA's apply_scale_32, SINGLE_ROUND: (value * multiplier + 2^(shift - 1)) >> shift (floor shift)."""
    return (value * multiplier + (1 << (shift - 1))) >> shift


def round_half_away(value: float) -> int:
    whole = math.trunc(value)
    fraction = value - whole  # exact in binary floating point
    return whole + (int(math.copysign(1, value)) if abs(fraction) >= 0.5 else 0)


def round_half_even(value: Fraction) -> int:
    floor = math.floor(value)
    twice = 2 * (value - floor)
    return floor + (1 if twice > 1 or (twice == 1 and floor % 2 == 1) else 0)


def fma_f32(a: np.float32, b: np.float32, c: np.float32) -> np.float32:
    """a * b + c rounded once to float32 (nearest, ties to even), decided with exact rationals."""
    exact = Fraction(float(a)) * Fraction(float(b)) + Fraction(float(c))
    guess = np.float32(float(exact))
    candidates = [np.nextafter(guess, np.float32(-np.inf)), guess, np.nextafter(guess, np.float32(np.inf))]
    return min(candidates, key=lambda f: (abs(Fraction(float(f)) - exact), int(f.view(np.uint32)) & 1))


def elementwise(fn, *arrays) -> np.ndarray:
    arrays = np.broadcast_arrays(*arrays)
    flat = [a.reshape(-1).tolist() for a in arrays]
    return np.array([fn(*values) for values in zip(*flat)], dtype=np.int64).reshape(arrays[0].shape)


# ---------------------------------------------------------------------------------------------------------
# Kernels on int64 arrays, NCHW
# ---------------------------------------------------------------------------------------------------------
def conv2d_acc(x: np.ndarray, w: np.ndarray, stride, padding, dilation, groups) -> np.ndarray:
    n, _, h, width = x.shape
    cout, cin_g, kh, kw = w.shape
    x = np.pad(x, ((0, 0), (0, 0), (padding[0],) * 2, (padding[1],) * 2))
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (width + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = np.zeros((n, cout, oh, ow), dtype=np.int64)
    cout_g = cout // groups
    for g in range(groups):
        xs = x[:, g * cin_g:(g + 1) * cin_g]
        ws = w[g * cout_g:(g + 1) * cout_g]
        for i in range(kh):
            for j in range(kw):
                top, left = i * dilation[0], j * dilation[1]
                patch = xs[:, :, top:top + stride[0] * (oh - 1) + 1:stride[0],
                           left:left + stride[1] * (ow - 1) + 1:stride[1]]
                out[:, g * cout_g:(g + 1) * cout_g] += np.einsum("nchw,oc->nohw", patch, ws[:, :, i, j])
    return out


def window_view(x: np.ndarray, params: dict, fill: int):
    (kh, kw), (sh, sw), (ph, pw) = params["kernel_size"], params["stride"], params["padding"]
    dh, dw = params.get("dilation", (1, 1))
    assert not params["ceil_mode"]
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=fill)
    oh = (x.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (x.shape[3] - dw * (kw - 1) - 1) // sw + 1
    return [x[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            for i in range(kh) for j in range(kw)]


# ---------------------------------------------------------------------------------------------------------
# The interpreter: one function per op, per target, from the golden parameters alone
# ---------------------------------------------------------------------------------------------------------
class GoldenInterpreter:
    def __init__(self, directory: Path):
        self.root = Path(directory)
        self.index = json.loads((self.root / "index.json").read_text())
        self.target = self.index["target"]

    def load(self, relative: str) -> np.ndarray:
        return np.load(self.root / relative, allow_pickle=False)

    def quantize(self, x: np.ndarray, qparams: dict) -> np.ndarray:
        scale, zero_point = np.float32(qparams["scale"]), qparams["zero_point"]
        lo, hi = dtype_range(qparams["dtype"])
        if self.target == "tflite":
            q = elementwise(round_half_away, (x.astype(np.float32) / scale).astype(np.float64))
        elif self.target == "onnxruntime":
            q = np.rint(x.astype(np.float32) / scale).astype(np.int64)
        else:
            q = elementwise(lambda v: round_half_even(Fraction(v) / Fraction(float(scale))), x.astype(np.float64))
        return np.clip(q + zero_point, lo, hi)

    def layer(self, x: np.ndarray, p: dict) -> np.ndarray:
        w = self.load(p["weight_file"]).astype(np.int64)
        centered = x - p["input"]["zero_point"]
        geometry = p["geometry"]
        if geometry["kind"] == "conv2d":
            acc = conv2d_acc(centered, w, geometry["stride"], geometry["padding"], geometry["dilation"],
                             geometry["groups"])
            channel_shape = (1, -1, 1, 1)
        else:
            acc = np.einsum("ni,oi->no", centered, w)
            channel_shape = (1, -1)
        if p["bias_file"] is not None:
            acc = acc + self.load(p["bias_file"]).astype(np.int64).reshape(channel_shape)
        assert np.abs(acc).max() <= INT32_MAX

        def per_channel(key):
            return np.asarray(p[key]).reshape(channel_shape)

        if self.target == "tflite-micro" or (self.target == "tflite" and geometry["kind"] == "conv2d"):
            scaled = elementwise(multiply_by_quantized_multiplier, acc, per_channel("multiplier"),
                                 per_channel("shift"))
        elif self.target == "tflite":
            scaled = elementwise(lambda a, m: round_half_away(float(a) * m), acc, per_channel("real_multiplier"))
        elif self.target == "tosa":
            scaled = elementwise(apply_scale_32, acc, per_channel("multiplier"), per_channel("shift"))
        elif self.target in ("onnxruntime", "xnnpack", "executorch-xnnpack"):
            product = acc.astype(np.float32) * per_channel("multiplier_f32").astype(np.float32)
            scaled = np.rint(product).astype(np.int64)
        else:
            ratios = np.array([Fraction(int(a), int(b)) for a, b in zip(p["multiplier_exact"]["numerator"],
                                                                        p["multiplier_exact"]["denominator"])],
                              dtype=object).reshape(channel_shape)
            scaled = elementwise(lambda a, r: round_half_even(a * r), acc, ratios)
        return np.clip(scaled + p["output"]["zero_point"], *p["clamp"])

    def add(self, a: np.ndarray, b: np.ndarray, p: dict) -> np.ndarray:
        za, zb, zy = p["input_a"]["zero_point"], p["input_b"]["zero_point"], p["output"]["zero_point"]
        sign = -1 if p.get("subtract") else 1
        if self.target in ("tflite", "tflite-micro"):
            def one(qa, qb):
                sa = multiply_by_quantized_multiplier((qa - za) << p["left_shift"], p["input_a_multiplier"],
                                                      p["input_a_shift"])
                sb = multiply_by_quantized_multiplier((qb - zb) << p["left_shift"], p["input_b_multiplier"],
                                                      p["input_b_shift"])
                return multiply_by_quantized_multiplier(sa + sign * sb, p["output_multiplier"],
                                                        p["output_shift"]) + zy
            raw = elementwise(one, a, b)
        elif self.target == "tosa":  # RESCALE both to int32, ADD / SUB, RESCALE the sum
            def one(qa, qb):
                wide_a = apply_scale_32(qa - za, p["input_a_multiplier"], p["input_a_shift"])
                wide_b = apply_scale_32(qb - zb, p["input_b_multiplier"], p["input_b_shift"])
                return apply_scale_32(wide_a + sign * wide_b, p["output_multiplier"], p["output_shift"]) + zy
            raw = elementwise(one, a, b)
        elif self.target in ("xnnpack", "executorch-xnnpack"):  # qs8-vadd: >> shift, halves up
            total = (a - za) * p["input_a_multiplier"] + (b - zb) * p["input_b_multiplier"]
            raw = ((total + (1 << (p["shift"] - 1))) >> p["shift"]) + zy
        elif self.target == "onnxruntime":
            assert not p["swapped"]
            ra, rb, offset = (np.float32(p[k]) for k in ("ratio_first_f32", "ratio_second_f32", "offset_f32"))

            def one(qa, qb):
                inner = fma_f32(np.float32(qb), rb, offset)
                return int(np.rint(fma_f32(np.float32(qa), ra, inner)))
            raw = elementwise(one, a, b)
        else:
            ra, rb = (Fraction(int(p[k]["numerator"][0]), int(p[k]["denominator"][0]))
                      for k in ("ratio_a_exact", "ratio_b_exact"))
            raw = elementwise(lambda qa, qb: zy + round_half_even((qa - za) * ra + (qb - zb) * rb), a, b)
        return np.clip(raw, *p["clamp"])

    def max_pool(self, x: np.ndarray, p: dict) -> np.ndarray:
        return np.max(np.stack(window_view(x, p, fill=np.iinfo(np.int64).min)), axis=0)

    def average_pool(self, x: np.ndarray, p: dict) -> np.ndarray:
        assert p["padding"] == [0, 0], "the test's pools have no padding: every window holds kh * kw codes"
        z = p["qparams"]["zero_point"]
        lo, hi = dtype_range(p["qparams"]["dtype"])
        count = p["kernel_size"][0] * p["kernel_size"][1]
        sums = sum(window_view(x - z, p, fill=0))
        if self.target == "tflite":
            raw = sums + z * count  # the reference kernel averages raw codes, ties away from zero
            avg = elementwise(lambda s: int((s + count // 2) / count) if s > 0 else -int((-s + count // 2) / count),
                              raw)
        elif self.target == "onnxruntime":
            assert p["global"]
            avg = np.rint(sums.astype(np.float32) * np.float32(p["multiplier_f32"])).astype(np.int64) + z
        else:
            avg = z + elementwise(lambda s: round_half_even(Fraction(s, count)), sums)
        return np.clip(avg, lo, hi)

    def call(self, args: list, p: dict) -> np.ndarray:
        assert p["function"] == "function:torch.flatten" and p["args"]["$tuple"][1] == 1
        x = args[0]
        return x.reshape(x.shape[0], -1)

    def run(self, float_inputs=None):
        """Every node's codes, computed from the inputs (float or recorded codes) and the parameters."""
        env = {}
        inputs = iter(self.index["inputs"])
        for node in self.index["nodes"]:
            op, p = node["op"], node.get("params", {})
            args = [env[i["name"]] for i in node["inputs"]]
            if op == "input":
                entry = next(inputs)
                env[node["name"]] = (self.quantize(self.load(entry["float_file"]), p["qparams"])
                                     if float_inputs else self.load(entry["file"]).astype(np.int64))
            elif op in ("conv2d", "linear"):
                env[node["name"]] = self.layer(args[0], p)
            elif op == "add":
                env[node["name"]] = self.add(args[0], args[1], p)
            elif op == "max_pool2d":
                env[node["name"]] = self.max_pool(args[0], p)
            elif op == "avg_pool2d":
                env[node["name"]] = self.average_pool(args[0], p)
            elif op == "call":
                env[node["name"]] = self.call(args, p)
            else:
                raise AssertionError(f"the test interpreter has no op {op}")
        return env


def dtype_range(dtype: str):
    info = np.iinfo(dtype)
    return int(info.min), int(info.max)


# ---------------------------------------------------------------------------------------------------------
# The model and the claims
# ---------------------------------------------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1, dilation=1, groups=4)
        self.gap = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.bn(self.conv(x)))
        x = F.relu(self.down(self.pool(x)))
        return self.fc(torch.flatten(self.gap(x), 1))


def convert_small_cnn(target: str):
    torch.manual_seed(0)
    example = torch.randn(2, 3, 8, 8)
    prepared = qp.prepare_qat(SmallCNN(), example, target=target)
    prepared.train()
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.01)
    for _ in range(3):
        loss = prepared(torch.randn(8, 3, 8, 8)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    qp.calibrate(prepared, [torch.randn(8, 3, 8, 8) for _ in range(3)])
    qp.freeze(prepared)
    return qp.convert(prepared)


@pytest.mark.parametrize("target", ["tflite", "onnxruntime", "exact"])
def test_numpy_interpreter_reproduces_every_node_from_golden_files(tmp_path, target):
    model = convert_small_cnn(target)
    x = torch.randn(3, 3, 8, 8) * 1.5
    index_path = golden(model, x, tmp_path)

    interpreter = GoldenInterpreter(index_path.parent)
    assert interpreter.index["format"] == "qparity-golden" and interpreter.index["target"] == target
    computed = interpreter.run(float_inputs=True)
    for node in interpreter.index["nodes"]:
        recorded = interpreter.load(node["output"])
        mine = computed[node["name"]]
        assert mine.shape == recorded.shape, node["name"]
        differ = int((mine != recorded).sum())
        assert differ == 0, f"node {node['name']} ({node['op']}): {differ} of {mine.size} codes differ"

    expected = model.run(model.quantize(x)).numpy()
    (output,) = interpreter.index["outputs"]
    np.testing.assert_array_equal(computed[output["name"]], expected)
    np.testing.assert_array_equal(interpreter.load(output["file"]), expected)


def test_golden_from_codes_matches_golden_from_floats(tmp_path):
    model = convert_small_cnn("tflite")
    x = torch.randn(2, 3, 8, 8)
    from_floats = golden(model, x, tmp_path / "floats")
    from_codes = golden(model, model.quantize(x), tmp_path / "codes")
    floats, codes = (json.loads(p.read_text()) for p in (from_floats, from_codes))
    assert "float_file" in floats["inputs"][0] and "float_file" not in codes["inputs"][0]
    for node in floats["nodes"]:
        np.testing.assert_array_equal(np.load(from_floats.parent / node["output"]),
                                      np.load(from_codes.parent / node["output"]))


def test_golden_files_load_without_pickle(tmp_path):
    model = convert_small_cnn("tflite")
    index_path = golden(model, torch.randn(1, 3, 8, 8), tmp_path)
    index = json.loads(index_path.read_text())
    conv = next(n for n in index["nodes"] if n["op"] == "conv2d")
    weight = np.load(tmp_path / conv["params"]["weight_file"], allow_pickle=False)
    assert weight.dtype == np.int8 and weight.shape == (8, 3, 3, 3)
    assert len(conv["params"]["multiplier"]) == len(conv["params"]["shift"]) == 8
    add = next(n for n in index["nodes"] if n["op"] == "add")
    assert add["params"]["left_shift"] == 20
    for path in tmp_path.rglob("*.npy"):
        assert np.load(path, allow_pickle=False).dtype != object


def test_golden_into_a_path_that_is_a_file_is_a_file_access_error(tmp_path):
    from qparity.errors import FileAccessError

    torch.manual_seed(0)
    x = torch.randn(2, 3, 6, 6)
    prepared = qp.prepare_qat(torch.nn.Conv2d(3, 4, 3), (x,), target="tflite")
    qp.calibrate(prepared, [x])
    integer = qp.convert(qp.freeze(prepared))
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    with pytest.raises(FileAccessError, match="cannot write golden vectors"):
        qp.golden(integer, x, blocker)
    with pytest.raises(qp.QParityError, match="must be a path"):
        qp.golden(integer, x, 42)


@pytest.mark.parametrize("target", ["tflite-micro", "tosa", "xnnpack", "executorch-xnnpack"])
def test_layer_and_add_parameters_of_the_newer_targets_rebuild_their_codes(tmp_path, target):
    """Each conv, linear and add node, from its recorded input codes and the parameters index.json gives alone
    (Q31 / RESCALE / float32 / XNNPACK fixed-point multipliers), gives the recorded output codes."""
    from qparity.demo import DigitsNet

    torch.manual_seed(0)
    batches = [torch.randn(8, 1, 8, 8) for _ in range(3)]
    prepared = qp.prepare_qat(DigitsNet(channels=4), batches[0], target=target)
    qp.calibrate(prepared, batches)
    qp.freeze(prepared)
    interpreter = GoldenInterpreter(golden(qp.convert(prepared), torch.randn(16, 1, 8, 8) * 1.5, tmp_path).parent)
    checked = 0
    for node in interpreter.index["nodes"]:
        if node["op"] not in ("conv2d", "linear", "add"):
            continue
        inputs = [interpreter.load(i["file"]).astype(np.int64) for i in node["inputs"]]
        if node["op"] == "add":
            mine = interpreter.add(*inputs, node["params"])
        else:
            mine = interpreter.layer(inputs[0], node["params"])
        np.testing.assert_array_equal(mine, interpreter.load(node["output"]), err_msg=node["name"])
        checked += 1
    assert checked == 6  # 4 convs, the residual add, the linear layer
