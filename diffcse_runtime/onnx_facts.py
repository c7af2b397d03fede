"""Two facts about an ONNX graph, read from its protobuf without onnx, torch or a session.

`diffcse.json` says how wide the output is and how many tokens the model takes; a wrong
value there used to surface as a traceback at start-up or a 500 per long request. The graph
itself knows both: its output's declared width, and the rows of its position table (an
initializer named `...position_embeddings...`, plus BERT's `position_ids` buffer). Reading
them needs only the protobuf wire format: the file is memory-mapped and the large weight
payloads are skipped by their length, so a 400 MB graph costs a few milliseconds.

Field numbers (onnx.proto): ModelProto.graph = 7; GraphProto.initializer = 5,
GraphProto.output = 12; TensorProto.dims = 1, TensorProto.name = 8; ValueInfoProto.type = 2;
TypeProto.tensor_type = 1; TypeProto.Tensor.shape = 2; TensorShapeProto.dim = 1;
Dimension.dim_value = 1.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


@dataclass(frozen=True)
class GraphFacts:
    """What the graph declares; None where it does not say (a symbolic width, no table)."""

    output_width: int | None
    position_rows: int | None  # rows of the position table (before any RoBERTa offset)


class _Malformed(ValueError):
    pass


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf) or shift > 63:
            raise _Malformed("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) for each field; LEN values as views, not copies."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == _LEN:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise _Malformed("field runs past the end")
            yield number, wire, buf[pos : pos + size]
            pos += size
        elif wire in (_I64, _I32):
            pos += 8 if wire == _I64 else 4
        else:
            raise _Malformed(f"wire type {wire}")


def _sub(buf: memoryview, number: int) -> Iterator[memoryview]:
    for n, wire, value in _fields(buf):
        if n == number and wire == _LEN:
            yield value  # type: ignore[misc]


def _tensor_dims_and_name(tensor: memoryview) -> tuple[list[int], str]:
    dims: list[int] = []
    name = ""
    for n, wire, value in _fields(tensor):
        if n == 1 and wire == _VARINT:
            dims.append(value)  # type: ignore[arg-type]
        elif n == 1 and wire == _LEN:  # packed repeated int64
            pos, packed = 0, value
            while pos < len(packed):  # type: ignore[arg-type]
                dim, pos = _varint(packed, pos)  # type: ignore[arg-type]
                dims.append(dim)
        elif n == 8 and wire == _LEN:
            name = bytes(value).decode("utf-8", "replace")  # type: ignore[arg-type]
    return dims, name


def _output_width(value_info: memoryview) -> int | None:
    """The last dimension of the first output, if the graph fixes it to a number."""
    for type_proto in _sub(value_info, 2):
        for tensor_type in _sub(type_proto, 1):
            for shape in _sub(tensor_type, 2):
                dims = list(_sub(shape, 1))
                if not dims:
                    return None
                values = [v for n, w, v in _fields(dims[-1]) if n == 1 and w == _VARINT]
                return int(values[0]) if values else None
    return None


def _position_rows(graph: memoryview) -> int | None:
    rows: list[int] = []
    for tensor in _sub(graph, 5):
        dims, name = _tensor_dims_and_name(tensor)
        if "position_embeddings" in name and len(dims) == 2:
            rows.append(dims[0])
        elif name.endswith("position_ids") and len(dims) in (1, 2):
            rows.append(dims[-1])
    return min(rows) if rows else None


def read_graph_facts(path: str | Path) -> GraphFacts | None:
    """The graph's output width and position rows; None when the file is not a parseable
    ONNX model (onnxruntime then says why, when the Encoder loads it)."""
    with open(path, "rb") as fh:
        if not fh.seek(0, 2):
            return None
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _facts(view)
            except _Malformed:
                return None
            finally:
                view.release()


def _facts(model: memoryview) -> GraphFacts | None:
    graphs = list(_sub(model, 7))
    if not graphs:
        return None
    graph = graphs[0]
    outputs = list(_sub(graph, 12))
    width = _output_width(outputs[0]) if outputs else None
    facts = GraphFacts(output_width=width, position_rows=_position_rows(graph))
    del graphs, graph, outputs  # no view may outlive the mapping
    return facts
