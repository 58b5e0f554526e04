"""Hostile and malformed .qp files: edited, re-signed (checksum recomputed), and refused with a ModelFileError.

The checksum is integrity, not trust: each test here edits a valid file's JSON header, recomputes the
SHA-256 the way serialize does, and checks that `qparity.load` names what is wrong, never raising another
exception type (KeyError, RecursionError, a torch RuntimeError) or accepting a file a runtime would run
differently.
"""
import copy
import hashlib
import json
import os
import stat

import pytest
import torch
from torch import nn

import qparity as qp
from qparity.errors import ArgumentTypeError, FileAccessError, ModelFileError
from qparity.serialize import MAGIC, PREFIX, VERSION
from helpers import prepare_and_convert

INT32_MAX = 2**31 - 1


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(header, array data) of a valid tflite model with conv, fused ReLU, pool, flatten (a call) and linear."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))
    x = torch.randn(8, 2, 6, 6)
    path = tmp_path_factory.mktemp("hostile") / "model.qp"
    prepare_and_convert(model, (x,), "tflite", [x, x * 2])[1].save(path)
    raw = path.read_bytes()
    _, _, header_len, data_len = PREFIX.unpack_from(raw)
    header = json.loads(raw[PREFIX.size:PREFIX.size + header_len])
    return header, raw[PREFIX.size + header_len:PREFIX.size + header_len + data_len]


def resign(header_bytes: bytes, data: bytes) -> bytes:
    """A .qp file around an edited header, with its checksum recomputed as serialize does."""
    body = PREFIX.pack(MAGIC, VERSION, len(header_bytes), len(data)) + header_bytes + data
    return body + hashlib.sha256(body).digest()


def write(tmp_path, header, data: bytes, name: str = "edited.qp"):
    path = tmp_path / name
    text = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    path.write_bytes(resign(text, data))
    return path


def edited(header, path, value):
    """A copy of `header` with the field at `path` (keys and indices) set to `value` (DELETE: removed)."""
    header = copy.deepcopy(header)
    parent = header
    for key in path[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return header


DELETE = object()


def node(header, name):
    return next(n for n in header["graph"]["nodes"] if n["name"] == name)


def test_a_resigned_unedited_file_loads(saved, tmp_path):
    assert isinstance(qp.load(write(tmp_path, *saved)), qp.IntegerModel)


def field_paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from field_paths(child, path + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from field_paths(child, path + (index,))


# Wrong types, out-of-range numbers, unknown names, references to nothing, nesting: each field gets a few.
REPLACEMENTS = [DELETE, None, True, -1, 2**63, 1e300, -0.5, "op_system", "", [], {}, [None], {"$ref": "nowhere"},
                [[[[1]]]]]


def test_every_field_edited_to_garbage_gives_a_model_file_error_or_a_valid_model(saved, tmp_path):
    """Exhaustive over the header's fields, rotating through the replacements (4 per field): load either
    raises ModelFileError or returns a model (an edit can be harmless, e.g. -1 for a zero point)."""
    header, data = saved
    refused = 0
    for i, path in enumerate(p for p in field_paths(header) if p):
        for value in (REPLACEMENTS[(i + k) % len(REPLACEMENTS)] for k in range(0, len(REPLACEMENTS), 4)):
            file = write(tmp_path, edited(header, path, value), data)
            try:
                qp.load(file)
            except ModelFileError:
                refused += 1
            except Exception as error:  # noqa: BLE001 - the claim is that no other type escapes
                pytest.fail(f"editing {path} to {value!r} raised {type(error).__name__}: {error}")
    assert refused > 500


@pytest.mark.parametrize("edit, match", [
    (lambda h: node(h, "_2").update(op="op_system"), "'op_system', which is not a qparity operator"),
    (lambda h: node(h, "_0")["args"].update({"$tuple": [{"$ref": "_4"}]}), "refers to '_4', which is not a node "
                                                                           "computed before it"),
    (lambda h: node(h, "_0")["args"].update({"$tuple": [{"$ref": "_0"}]}), "refers to '_0'"),
    (lambda h: node(h, "_3")["args"].update({"$tuple": [{"$ref": "undefined"}, 1, -1]}), "refers to 'undefined'"),
    (lambda h: h["graph"].update(output={"$ref": "undefined"}), "the graph output refers to 'undefined'"),
    (lambda h: h["graph"]["nodes"].append(copy.deepcopy(h["graph"]["nodes"][1])), "two graph nodes are named '_0'"),
    (lambda h: h["graph"].update(input_shapes=[[200000, 200000, 1000]]), "over qparity's budget"),
    (lambda h: h["graph"].update(input_shapes=[[8, 2, 0, 6]]), "must hold integers >= 1"),
    (lambda h: h["graph"].update(input_shapes=[[8, 3, 6, 6]]), "fails on its own declared input shapes"),
    (lambda h: h["graph"].update(input_shapes=[[8, 2, 2]]), "fails on its own declared input shapes"),
    (lambda h: h["graph"].update(input_shapes=[]), "1 input node\\(s\\) but 0 input shape"),
    (lambda h: h["qparams"]["_0"].update(scale=1e300), "not representable as a positive float32"),
    (lambda h: h["qparams"]["_0"].update(scale=0.0), "scale must be finite and > 0"),
    (lambda h: h["qparams"]["_0"].update(zero_point=300), "outside the int8 range"),
    (lambda h: h["qparams"]["_0"].update(zero_point=1.5), "must be numbers"),
    (lambda h: h["qparams"]["_0"].update(dtype="float64"), "unknown code dtype 'float64'"),
    (lambda h: h["qparams"].pop("_4"), "nodes \\['_4'\\] have no qparams"),
    (lambda h: h["qparams"].update(ghost=h["qparams"]["_0"]), "qparams for 'ghost', which is not a graph node"),
    (lambda h: h["arrays"][0].update(dtype="object"), "dtype 'object'"),
    (lambda h: h["arrays"][0].update(dtype="int32"), "declares 72 bytes; its shape \\[4, 2, 3, 3\\] of int32 takes 288"),
    (lambda h: h["arrays"][0].update(shape=[4, 2, 3, 4]), "declares 72 bytes"),
    (lambda h: h["arrays"][1].update(offset=60), "overlaps the array before it"),
    (lambda h: h["arrays"][1].update(offset=80), "leaving bytes 72..80 unused"),
    (lambda h: h["arrays"][-1].update(offset=10**12), "offset"),
    (lambda h: h["arrays"].pop(), "the rest of the data belongs to none"),
    (lambda h: h["arrays"][0].update(name="_4.bias_codes"), "declared twice"),
    (lambda h: h["layers"]["_0"]["weight_codes"].update(array="absent"), "array 'absent', which the file does not"),
    (lambda h: h["layers"]["_0"].update(weight_codes={"array": "_4.weight_codes"}), "belong to no layer"),
    (lambda h: h["layers"].pop("_0"), "conv2d node '_0' has no entry in 'layers'"),
    (lambda h: h.update(target="tpu"), "unknown target 'tpu'"),
    (lambda h: h.update(activation_dtype="uint8"), "activation dtype 'uint8' is not one target 'tflite' runs"),
    (lambda h: h.update(pytorch_kernels="2.13"), "does not follow PyTorch's kernels"),
    (lambda h: node(h, "_3")["attrs"].update({"$dict": [["fn", "function:os.system"]]}), "not one of the calls"),
    (lambda h: node(h, "_3")["attrs"].update({"$dict": [["fn", "function:getattr"]]}) or
     node(h, "_3")["args"].update({"$tuple": [{"$ref": "_2"}, "__class__"]}), "reads attribute"),
    (lambda h: node(h, "_3")["args"].update({"$tuple": [{"$ref": "_2"}, {"$dtype": "torch.load"}]}),
     "not a torch dtype"),
    (lambda h: node(h, "_3")["args"].update({"$tuple": [{"$ref": "_2"}, {"x": 1}]}), "not an encoded value"),
    (lambda h: node(h, "_0")["attrs"]["$dict"][2].__setitem__(1, {"$tuple": [1e300, None]}), "clamp"),
    (lambda h: node(h, "_0")["attrs"]["$dict"][0][1]["$dict"][0].__setitem__(1, "linear"),
     "is a conv2d with a 'linear' geometry"),
])
def test_named_hostile_edits_are_refused_with_the_reason(saved, tmp_path, edit, match):
    header = copy.deepcopy(saved[0])
    edit(header)
    with pytest.raises(ModelFileError, match=match):
        qp.load(write(tmp_path, header, saved[1]))


def test_deep_nesting_is_refused_not_a_recursion_error(saved, tmp_path):
    header, data = saved
    for depth in (100, 100_000):
        text = json.dumps(header).replace('"path": "module \'3\'"', '"path": ' + "[" * depth + "]" * depth)
        with pytest.raises(ModelFileError, match="nest"):
            qp.load(write(tmp_path, text.encode(), data))


def test_nan_and_infinity_in_the_header_are_refused(saved, tmp_path):
    header, data = saved
    for constant in ("NaN", "Infinity", "-Infinity"):
        text = json.dumps(header).replace('"scale": ' + json.dumps(header["qparams"]["_0"]["scale"]),
                                          f'"scale": {constant}', 1)
        with pytest.raises(ModelFileError, match=constant):
            qp.load(write(tmp_path, text.encode(), data))


def set_array(header, data: bytes, name: str, values: torch.Tensor) -> bytes:
    entry = next(a for a in header["arrays"] if a["name"] == name)
    blob = values.numpy().astype(values.numpy().dtype.newbyteorder("<")).tobytes()
    assert len(blob) == entry["nbytes"]
    return data[:entry["offset"]] + blob + data[entry["offset"] + entry["nbytes"]:]


def test_a_bias_at_int32_max_is_refused_where_a_runtime_would_wrap(saved, tmp_path):
    """Regression: such a file loaded and saturated, where a real int32 accumulator wraps around."""
    header, data = saved
    data = set_array(header, data, "_0.bias_codes", torch.tensor([INT32_MAX, 0, 0, 0], dtype=torch.int32))
    with pytest.raises(ModelFileError, match=r"'_0' \(module '0'\): output channel 0 .* overflows the int32"):
        qp.load(write(tmp_path, header, data))


def test_non_finite_and_negative_weight_scales_are_refused(saved, tmp_path):
    header, data = saved
    for bad in (float("nan"), float("inf"), -1.0, 0.0):
        edited_data = set_array(header, data, "_4.weight_scale", torch.tensor([bad, 1e-3, 1e-3]))
        with pytest.raises(ModelFileError, match="layer '_4': a weight scale is not finite and positive"):
            qp.load(write(tmp_path, header, edited_data))


def test_a_header_that_is_not_an_object_is_refused(saved, tmp_path):
    for text in (b"[]", b"3", b'"qparity-integer-model"', b"\xff\xfe"):
        with pytest.raises(ModelFileError):
            qp.load(write(tmp_path, text, saved[1]))


def test_load_of_bad_paths_names_the_problem(tmp_path):
    with pytest.raises(FileAccessError, match="is a directory"):
        qp.load(tmp_path)
    with pytest.raises(FileAccessError, match="does not exist"):
        qp.load(tmp_path / "absent.qp")
    for wrong in (None, 3, b"model.qp", ["model.qp"]):
        with pytest.raises(ArgumentTypeError, match="must be a path"):
            qp.load(wrong)
    assert issubclass(FileAccessError, OSError) and issubclass(ArgumentTypeError, TypeError)


@pytest.fixture
def model(saved, tmp_path):
    return qp.load(write(tmp_path, *saved, name="source.qp"))


def test_save_into_a_missing_or_unwritable_directory_leaves_nothing(model, tmp_path):
    with pytest.raises(FileAccessError, match="does not exist"):
        model.save(tmp_path / "absent" / "model.qp")
    with pytest.raises(FileAccessError, match="is a directory"):
        model.save(tmp_path)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user who can write anywhere (root)")
        with pytest.raises(FileAccessError, match="cannot write"):
            model.save(locked / "model.qp")
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(stat.S_IRWXU)


def test_a_failed_save_keeps_the_old_file_and_leaves_no_temporary(model, tmp_path, monkeypatch):
    path = tmp_path / "model.qp"
    model.save(path)
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(FileAccessError, match="No space left on device"):
        model.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.qp", "source.qp"]


def test_saved_files_get_the_usual_permissions(model, tmp_path):
    path = tmp_path / "model.qp"
    model.save(path)
    reference = tmp_path / "reference"
    reference.write_bytes(b"")
    assert stat.S_IMODE(path.stat().st_mode) == stat.S_IMODE(reference.stat().st_mode)



def test_every_layer_operator_of_the_registry_has_a_weight_rank_here():
    from qparity.file_checks import WEIGHT_RANKS
    from qparity.ops.registry import LAYER_OPS

    assert set(WEIGHT_RANKS) == set(LAYER_OPS)


def test_a_program_tied_to_its_batch_size_still_loads(tmp_path):
    """load runs one sample first, then the declared batch: a fixed-batch reshape is the user's choice."""
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(12, 3)

        def forward(self, x):
            return self.fc(x.view(4, 12))

    x = torch.randn(4, 3, 4)
    _, integer = prepare_and_convert(FixedBatch(), (x,), "tflite", [x])
    integer.save(tmp_path / "fixed.qp")
    assert torch.equal(qp.load(tmp_path / "fixed.qp")(x), integer(x))


def test_a_file_whose_target_cannot_run_one_of_its_operators_is_refused(tmp_path):
    """The registry's refusals hold for files too: hardsigmoid saved for 'exact', relabelled 'tflite'."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 5, 5)
    _, integer = prepare_and_convert(nn.Sequential(nn.Conv2d(3, 4, 1), nn.Hardsigmoid()), (x,), "exact", [x],
                                     activation_dtype="int8")
    integer.save(tmp_path / "exact.qp")
    raw = (tmp_path / "exact.qp").read_bytes()
    _, _, header_len, data_len = PREFIX.unpack_from(raw)
    header = json.loads(raw[PREFIX.size:PREFIX.size + header_len])
    header["target"] = "tflite"
    data = raw[PREFIX.size + header_len:PREFIX.size + header_len + data_len]
    with pytest.raises(ModelFileError, match="hardsigmoid at .* cannot run on target 'tflite'"):
        qp.load(write(tmp_path, header, data))
