"""The rule of PyTorch's PT2E reference graph (torchao convert_pt2e): float32 arithmetic on dequantized values,
then quantized_decomposed.quantize_per_tensor. The doctor replays it to say which codes that rule explains."""
import torch


def reference_codes(y: torch.Tensor, scale: float, zero_point: int, qmin: int, qmax: int) -> torch.Tensor:
    """quantized_decomposed.quantize_per_tensor: clamp(round(y * (1.0 / scale)) + zero_point) with y float32
    (torch/ao/quantization/fx/_decomposed.py, torch 2.13 and 2.14: it multiplies by the reciprocal)."""
    return torch.clamp(torch.round(y * (1.0 / scale)) + zero_point, qmin, qmax).to(torch.int64)
