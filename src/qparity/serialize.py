"""The .qp file: an IntegerModel as data (JSON + raw little-endian arrays + SHA-256), never pickle.

Layout: magic b"QPARITY\\n", u32 format version, u64 header length, u64 data length, the JSON header,
the array bytes, then the SHA-256 of everything before it. Loading checks each of these and names what is
wrong (empty, another format, truncated, corrupted) before any content is interpreted.

The checksum is integrity, not trust: it catches damage in storage or transfer, but anyone who edits a file
can recompute it. So `read_model` then checks every field of the header as if it came from a stranger
(file_checks.py: types, array offsets and sizes, graph references, shape budgets, quantization parameters,
layer constants), and `qparity.load` checks that no int32 accumulator can overflow, as convert does.
Every failure is a ModelFileError naming the field; `save` writes a temporary file next to the target and
renames it into place, so a failed save leaves neither a partial file nor a stray temporary.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch

from . import file_checks
from .errors import ModelFileError, QParityError
from .file_checks import DTYPES, HeaderError
from .files import read_bytes, replacing
from .graph import Graph
from .ops.aten_float import layer_kind
from .qparams import QParams
from .numerics import Target, get_target
from .numerics.pytorch_engines import UNRECORDED_MEMORY_FORMAT, UNRECORDED_THREADS
from .ops.layer import IntegerLayer

MAGIC = b"QPARITY\n"
VERSION = 1
PREFIX = struct.Struct("<8sIQQ")
DIGEST_SIZE = 32


@dataclass
class SavedModel:
    """What a .qp file holds, validated; `qparity.load` makes an IntegerModel of it."""

    where: str
    graph: Graph
    target: Target
    activation_dtype: str
    qparams: Dict[str, QParams]
    layers: Dict[str, IntegerLayer]


def save_model(model, path) -> None:
    """Write an IntegerModel (graph, target, grids, layer constants) as a .qp file."""
    arrays: List[Tuple[str, np.ndarray]] = []

    def add(name: str, tensor: torch.Tensor) -> dict:
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        arrays.append((name, array))
        return {"array": name}

    layers = {}
    for name, layer in model.layers.items():
        layers[name] = {"weight_codes": add(f"{name}.weight_codes", layer.weight_codes),
                        "weight_scale": add(f"{name}.weight_scale", layer.weight_scale.reshape(-1)),
                        "weight_scale_per_channel": layer.weight_scale.dim() > 0,
                        "bias_codes": None if layer.bias_codes is None else add(f"{name}.bias_codes", layer.bias_codes)}
    table, offset, blobs = [], 0, []
    for name, array in arrays:
        data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()
        table.append({"name": name, "dtype": array.dtype.name, "shape": list(array.shape), "offset": offset,
                      "nbytes": len(data)})
        blobs.append(data)
        offset += len(data)
    header = {"format": "qparity-integer-model", "version": VERSION, "target": model.target.name,
              **model.target.settings(),
              "activation_dtype": model.activation_dtype, "graph": model.graph.to_dict(),
              "qparams": {k: v.to_dict() for k, v in model.qparams.items()}, "layers": layers, "arrays": table}
    header_bytes = json.dumps(header, separators=(",", ":")).encode("utf-8")
    data_bytes = b"".join(blobs)
    body = PREFIX.pack(MAGIC, VERSION, len(header_bytes), len(data_bytes)) + header_bytes + data_bytes
    with replacing(path, "the model file") as temporary:
        with open(temporary, "wb") as f:
            f.write(body + hashlib.sha256(body).digest())


def _target(header: dict):
    """The target with the settings the file records (`Target.settings`: an engine target's PyTorch release,
    thread count and input layout), so the model computes the same integers wherever it is loaded. Files
    written before the thread count and layout were recorded get UNRECORDED_THREADS and
    UNRECORDED_MEMORY_FORMAT (docs/determinism.md)."""
    target = get_target(header["target"])
    release = header.get("pytorch_kernels")
    if not hasattr(target, "for_release"):
        if release is not None:
            raise ValueError(f"target {target.name!r} does not follow PyTorch's kernels, yet the file names "
                             f"PyTorch release {release!r}")
        return target
    if release is not None:
        target = target.for_release(str(release))
    threads = header.get("engine_threads", UNRECORDED_THREADS)
    memory_format = header.get("memory_format", UNRECORDED_MEMORY_FORMAT)
    if threads is None or memory_format is None:
        raise ValueError("the file records an engine thread count or memory format of null")
    return target.configured(threads, memory_format)


def read_model(path) -> SavedModel:
    """Read a .qp file; raises ModelFileError for anything but an intact, well-formed file (FileAccessError
    for a file that cannot be read)."""
    raw = read_bytes(path, "the model file")
    where = os.fspath(path)
    header, data = _unpack(raw, where)
    try:
        return _build(header, data, where)
    except (QParityError, KeyError, TypeError, ValueError) as error:  # HeaderError is a ValueError
        raise invalid_content(where, error) from error


def invalid_content(where: str, error: Exception) -> ModelFileError:
    """The error for a file whose checksum matches but whose content does not hold together."""
    reason = f"missing {error}" if isinstance(error, KeyError) else error
    return ModelFileError(f"{where!r} is not a valid qparity model (its checksum matches, but that proves "
                          f"integrity, not trust): {reason}")


def _unpack(raw: bytes, where: str):
    if not raw:
        raise ModelFileError(f"{where!r} is empty")
    if not MAGIC.startswith(raw[:len(MAGIC)]):
        raise ModelFileError(f"{where!r} is not a qparity model file (it does not start with {MAGIC!r})")
    if len(raw) < PREFIX.size:
        raise ModelFileError(f"{where!r} is truncated ({len(raw)} bytes)")
    _, version, header_len, data_len = PREFIX.unpack_from(raw)
    if version != VERSION:
        raise ModelFileError(f"{where!r} is qparity format version {version}; this qparity reads version {VERSION}")
    expected = PREFIX.size + header_len + data_len + DIGEST_SIZE
    if len(raw) < expected:
        raise ModelFileError(f"{where!r} is truncated: {len(raw)} bytes of the {expected} its header declares")
    if len(raw) > expected:
        raise ModelFileError(f"{where!r} is corrupted: {len(raw) - expected} unexpected bytes after the model")
    body, digest = raw[:-DIGEST_SIZE], raw[-DIGEST_SIZE:]
    if hashlib.sha256(body).digest() != digest:
        raise ModelFileError(f"{where!r} is corrupted: its SHA-256 checksum does not match its content")
    start = PREFIX.size
    try:
        header = json.loads(body[start:start + header_len].decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, HeaderError, RecursionError) as error:
        reason = "it nests too deeply" if isinstance(error, RecursionError) else error
        raise ModelFileError(f"{where!r} has an unreadable header: {reason}") from error
    if not isinstance(header, dict) or header.get("format") != "qparity-integer-model":
        found = header.get("format") if isinstance(header, dict) else type(header).__name__
        raise ModelFileError(f"{where!r} holds {found!r}, not a qparity integer model")
    return header, body[start + header_len:]


def _refuse_constant(name: str):
    """JSON's NaN and Infinity: no field of a .qp header holds them (save writes finite numbers only)."""
    raise HeaderError(f"the header holds {name}, which no field of a qparity model takes")


def _build(header: dict, data: bytes, where: str) -> SavedModel:
    file_checks.check_depth(header)
    file_checks.require_keys(header, ("target", "activation_dtype", "graph", "qparams", "layers", "arrays"),
                             "the header")
    target = _target(header)
    activation_dtype = header["activation_dtype"]
    file_checks.require(activation_dtype in target.activation_dtypes,
                        f"activation dtype {activation_dtype!r} is not one target {target.name!r} runs "
                        f"({', '.join(target.activation_dtypes)})")
    table = file_checks.check_arrays(header["arrays"], len(data))
    file_checks.check_graph(header["graph"])
    graph = Graph.from_dict(header["graph"])
    entries = file_checks.require_type(header["layers"], dict, "'layers'")
    file_checks.check_nodes(graph.nodes, entries)
    file_checks.check_qparams(header["qparams"], graph.nodes)
    qparams = {k: QParams.from_dict(v) for k, v in header["qparams"].items()}
    used = [file_checks.check_layer_entry(name, entry, table) for name, entry in entries.items()]
    unused = sorted(set(table) - {array for names in used for array in names.values()})
    file_checks.require(not unused, f"arrays {unused} belong to no layer")
    arrays = {name: _array(entry, data) for name, entry in table.items()}
    layers = {}
    for (name, entry), names in zip(entries.items(), used):
        weight, scale = arrays[names["weight_codes"]], arrays[names["weight_scale"]]
        bias = arrays[names["bias_codes"]] if "bias_codes" in names else None
        per_channel = entry["weight_scale_per_channel"]
        file_checks.check_layer_arrays(name, layer_kind(graph.node(name)), per_channel, target.float_bias, weight,
                                       scale, bias)
        layers[name] = IntegerLayer(weight, scale if per_channel else scale.reshape(()), bias)
    return SavedModel(where, graph, target, activation_dtype, qparams, layers)


def _array(entry: dict, data: bytes) -> torch.Tensor:
    dtype = DTYPES[entry["dtype"]]
    chunk = data[entry["offset"]:entry["offset"] + entry["nbytes"]]
    array = np.frombuffer(chunk, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
    return torch.from_numpy(array.reshape(entry["shape"]).copy())
