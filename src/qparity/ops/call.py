"""call: shape operations (view, reshape, permute, indexing, split...) that move codes without changing them."""
from __future__ import annotations

from ..graph import CALLS, flatten_values, unwrap, wrap
from ..graph import QValue


def run(ctx, node, *args, **kwargs):
    grids = [v.qparams for v in flatten_values((args, kwargs)) if isinstance(v, QValue)]
    result = CALLS[node.attrs["fn"]](*unwrap(args), **unwrap(kwargs))
    return wrap(result, grids[0]) if grids else result
