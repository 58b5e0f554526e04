"""The .qp file: an IntegerModel as data (JSON + raw little-endian arrays + SHA-256), never pickle.

Layout: magic b"QPARITY\\n", u32 format version, u64 header length, u64 data length, the JSON header,
the array bytes, then the SHA-256 of everything before it. Loading checks each of these and names what is
wrong (empty, another format, truncated, corrupted) before any content is interpreted.
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

from .errors import ModelFileError
from .graph import Graph
from .qparams import QParams
from .numerics import Target, get_target
from .numerics.pytorch_engines import UNRECORDED_MEMORY_FORMAT, UNRECORDED_THREADS
from .ops.layer import IntegerLayer

MAGIC = b"QPARITY\n"
VERSION = 1
PREFIX = struct.Struct("<8sIQQ")
DIGEST_SIZE = 32
DTYPES = {"int8": np.int8, "int32": np.int32, "float32": np.float32}


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
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(body + hashlib.sha256(body).digest())
    os.replace(tmp, path)


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
    """Read a .qp file; raises ModelFileError for anything but an intact file."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as error:
        raise ModelFileError(f"cannot read {os.fspath(path)!r}: {error}") from error
    header, data = _unpack(raw, os.fspath(path))
    try:
        return _build(header, data, os.fspath(path))
    except (KeyError, TypeError, ValueError) as error:
        raise ModelFileError(f"{os.fspath(path)!r} has an intact checksum but content qparity cannot read: "
                             f"{error}") from error


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
        header = json.loads(body[start:start + header_len].decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelFileError(f"{where!r} has an unreadable header: {error}") from error
    if header.get("format") != "qparity-integer-model":
        raise ModelFileError(f"{where!r} holds {header.get('format')!r}, not a qparity integer model")
    return header, body[start + header_len:]


def _build(header: dict, data: bytes, where: str) -> SavedModel:
    arrays: Dict[str, torch.Tensor] = {}
    for entry in header["arrays"]:
        dtype = DTYPES[entry["dtype"]]
        chunk = data[entry["offset"]:entry["offset"] + entry["nbytes"]]
        array = np.frombuffer(chunk, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
        arrays[entry["name"]] = torch.from_numpy(array.reshape(entry["shape"]).copy())
    layers = {}
    for name, spec in header["layers"].items():
        scale = arrays[spec["weight_scale"]["array"]]
        layers[name] = IntegerLayer(arrays[spec["weight_codes"]["array"]],
                                    scale if spec["weight_scale_per_channel"] else scale.reshape(()),
                                    None if spec["bias_codes"] is None else arrays[spec["bias_codes"]["array"]])
    qparams = {k: QParams.from_dict(v) for k, v in header["qparams"].items()}
    return SavedModel(where, Graph.from_dict(header["graph"]), _target(header), header["activation_dtype"], qparams,
                      layers)
