"""Attention as the runtimes run it: no int8 runtime has a fused attention kernel, so capture writes
F.scaled_dot_product_attention and nn.MultiheadAttention out as the operators below (nodes of the program).

    scores = matmul(q, transpose(k, -2, -1)); scaled = mul(scores, constant(scale)); weights = softmax(scaled);
    out = matmul(weights, v)

nn.MultiheadAttention (self-attention, batch_first) adds its packed input projection as one linear layer on
the module's own `in_proj_weight` / `in_proj_bias` (so QAT trains them), the heads split and merged by layout
calls, and its `out_proj` as a second linear layer.
"""
from __future__ import annotations

import math
from typing import List

from torch import nn

from ..graph import Node, Ref
from ..numerics.accumulate import ConvGeometry


class InProjection(nn.Module):
    """nn.MultiheadAttention's packed q, k, v projection as a linear layer's weight and bias (the same
    Parameters: training the layer trains the user's module)."""

    def __init__(self, attention: nn.MultiheadAttention):
        super().__init__()
        self.weight = attention.in_proj_weight
        self.bias = attention.in_proj_bias


def attention_nodes(name: str, q: Ref, k: Ref, v: Ref, scale: float, rank: int, where: str) -> List[Node]:
    """matmul(q, k^T) * scale -> softmax -> matmul with v; the last node, named `name`, is the output."""
    key_t = Node(name + "_key_t", "call", (k, -2, -1), {}, {"fn": "method:transpose"}, where)
    scores = Node(name + "_scores", "matmul", (q, Ref(key_t.name)), {}, {}, where)
    factor = Node(name + "_scale", "constant", (), {}, {"value": scale, "shape": [1] * rank}, where)
    scaled = Node(name + "_scaled", "mul", (Ref(scores.name), Ref(factor.name)), {}, {}, where)
    weights = Node(name + "_weights", "softmax", (Ref(scaled.name),), {}, {}, where)
    return [key_t, scores, factor, scaled, weights, Node(name, "matmul", (Ref(weights.name), v), {}, {}, where)]


def multihead_attention_nodes(name: str, x: Ref, module_name: str, attention: nn.MultiheadAttention, tokens: int,
                              where: str) -> List[Node]:
    """Self-attention of x [N, T, E] through `attention` (batch_first); the last node, named `name`, is the output.
    The nodes named `name + "_in_proj"` and `name + "_out_proj"` are linear layers (InProjection, out_proj)."""
    heads, width = attention.num_heads, attention.embed_dim
    head_width = width // heads
    linear = {"geometry": ConvGeometry("linear").to_dict()}
    nodes = [Node(name + "_in_proj", "linear", (x,), {}, {**linear, "module": module_name + ".in_proj"}, where)]
    nodes.append(Node(name + "_split", "call", (Ref(nodes[-1].name), (-1, tokens, 3, heads, head_width)), {},
                      {"fn": "method:reshape"}, where))
    nodes.append(Node(name + "_heads", "call", (Ref(nodes[-1].name), (2, 0, 3, 1, 4)), {},
                      {"fn": "method:permute"}, where))
    q, k, v = (Node(f"{name}_{part}", "call", (Ref(name + "_heads"), i), {}, {"fn": "function:operator.getitem"},
                    where) for i, part in enumerate(("q", "k", "v")))
    nodes += [q, k, v]
    nodes += attention_nodes(name + "_attention", Ref(q.name), Ref(k.name), Ref(v.name), 1.0 / math.sqrt(head_width),
                             4, where)
    nodes.append(Node(name + "_merge", "call", (Ref(nodes[-1].name), 1, 2), {}, {"fn": "method:transpose"}, where))
    nodes.append(Node(name + "_merged", "call", (Ref(nodes[-1].name), (-1, tokens, width)), {},
                      {"fn": "method:reshape"}, where))
    nodes.append(Node(name, "linear", (Ref(nodes[-1].name),), {}, {**linear, "module": module_name + ".out_proj"},
                      where))
    return nodes
