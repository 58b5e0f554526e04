"""call: shape operations (view, reshape, permute, indexing, split...) that move codes without changing them."""
from __future__ import annotations

from ..errors import InputError
from ..graph import CALLS, flatten_values, unwrap, wrap
from ..graph import QValue


def run(ctx, node, *args, **kwargs):
    grids = [v.qparams for v in flatten_values((args, kwargs)) if isinstance(v, QValue)]
    result = calling(node, node.attrs["fn"], CALLS[node.attrs["fn"]], *unwrap(args), **unwrap(kwargs))
    return wrap(result, grids[0]) if grids else result


def calling(node, name: str, fn, *args, **kwargs):
    """fn(*args, **kwargs), the graph's own call, with its arguments as recorded when the model was captured (a
    view's sizes, a slice's bounds): inputs whose shapes they do not fit raise InputError naming the node."""
    try:
        return fn(*args, **kwargs)
    except (RuntimeError, IndexError, ValueError) as error:
        shapes = [tuple(a.shape) for a in args if hasattr(a, "shape")]
        raise InputError(f"{node.op} '{node.name}' ({name} at {node.path or node.name}) fails on inputs of shape "
                         f"{shapes}: {error}. Its arguments were recorded when the model was captured; run it on "
                         "inputs of the shapes it was captured with") from None
