"""Record what one PyTorch release's quantized kernels compute on exact ties (tests/test_pytorch_versions.py).

Run it under each PyTorch release the engine targets cover; it writes pytorch_kernels_<release>.json here.
Scales are powers of two and zero points odd, so every x * inv below is an exact half and the rounding
rules (zero point before or after rounding) give different codes.
"""
import json
import pathlib
import warnings

import torch

warnings.filterwarnings("ignore", message=".*quantiz.*deprecated.*")
SCALE, ZERO_POINT = 0.25, 101


def quint8(codes, channels_last=False):
    q = torch._make_per_tensor_quantized_tensor(torch.tensor(codes, dtype=torch.uint8), SCALE, ZERO_POINT)
    return q.contiguous(memory_format=torch.channels_last) if channels_last else q


def record() -> dict:
    torch.manual_seed(0)
    torch.backends.quantized.engine = "fbgemm"
    cases = {}
    x = ((torch.arange(-40, 40, dtype=torch.float32) + 0.5) * SCALE).tolist()
    cases["quantize_per_tensor"] = {"x": x, "codes": torch.quantize_per_tensor(
        torch.tensor(x), SCALE, ZERO_POINT, torch.quint8).int_repr().tolist()}
    a, b = torch.randint(0, 256, (2, 5)).tolist()
    cases["add_scalar_loop"] = {"a": a, "b": b, "out_scale": 2 * SCALE, "codes": torch.ops.quantized.add(
        quint8(a), quint8(b), 2 * SCALE, ZERO_POINT).int_repr().tolist()}
    for name, channels_last, channels in (("nhwc", True, 3), ("one_channel", False, 1), ("nchw", False, 3)):
        codes = torch.randint(0, 256, (1, channels, 1, 6)).tolist()
        q = quint8(codes, channels_last)
        cases[f"avg_pool2d_{name}"] = {"x": codes, "channels_last": channels_last, "codes": torch.nn.functional.avg_pool2d(
            q, (1, 2), (1, 2)).int_repr().tolist()}
        cases[f"adaptive_avg_pool2d_{name}"] = {"x": codes, "channels_last": channels_last, "codes": torch.nn.functional.adaptive_avg_pool2d(
            q, (1, 3)).int_repr().tolist()}
    codes = torch.randint(0, 256, (1, 16, 1, 2)).tolist()
    cases["adaptive_avg_pool2d_vector_loop"] = {"x": codes, "channels_last": True, "codes": torch.nn.functional.adaptive_avg_pool2d(
        quint8(codes, True), (1, 1)).int_repr().tolist()}
    codes = torch.randint(0, 256, (1, 3, 2, 2)).tolist()
    cases["cat_nhwc_scalar_loop"] = {"x": codes, "out_scale": 2 * SCALE, "codes": torch.ops.quantized.cat(
        [quint8(codes, True)], 1, 2 * SCALE, ZERO_POINT).int_repr().tolist()}
    return {"torch": torch.__version__, "scale": SCALE, "zero_point": ZERO_POINT, "cases": cases}


if __name__ == "__main__":
    data = record()
    release = ".".join(torch.__version__.split(".")[:2])
    path = pathlib.Path(__file__).with_name(f"pytorch_kernels_{release}.json")
    path.write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {path}")
