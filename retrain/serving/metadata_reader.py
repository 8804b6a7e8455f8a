"""Reading TFLite metadata back (flatbuffers only: no TFLite schema, no MediaPipe): the model
buffer named ``TFLITE_METADATA``, its tensors' names, descriptions and associated files, and the
labels packed as a zip entry. The writer is metadata.py; an independent reader (MediaPipe) checks
both in the tests."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import flatbuffers
from flatbuffers import number_types as _N
from flatbuffers.table import Table

from .metadata import (_ASSOCIATED_FILE_TYPES, _COLOR_SPACES, IMAGE_PROPERTIES, METADATA_FILE_IDENTIFIER,
                       METADATA_NAME, TFLITE_FILE_IDENTIFIER)



class _Tab:
    """A flatbuffer table with the few accessors reading needs."""

    def __init__(self, buf, pos):
        self.t = Table(buf, pos)

    def _offset(self, slot):
        return self.t.Offset(4 + 2 * slot)

    def string(self, slot):
        o = self._offset(slot)
        return self.t.String(o + self.t.Pos).decode("utf-8") if o else None

    def scalar(self, slot, flags, default=0):
        o = self._offset(slot)
        return self.t.Get(flags, o + self.t.Pos) if o else default

    def table(self, slot):
        o = self._offset(slot)
        return _Tab(self.t.Bytes, self.t.Indirect(o + self.t.Pos)) if o else None

    def tables(self, slot):
        o = self._offset(slot)
        if not o:
            return []
        start = self.t.Vector(o)
        return [_Tab(self.t.Bytes, self.t.Indirect(start + 4 * i)) for i in range(self.t.VectorLen(o))]

    def floats(self, slot):
        o = self._offset(slot)
        if not o:
            return None
        start = self.t.Vector(o)
        return [self.t.Get(_N.Float32Flags, start + 4 * i) for i in range(self.t.VectorLen(o))]

    def byte_range(self, slot):
        """(start, length) of a [ubyte] vector, or None."""
        o = self._offset(slot)
        if not o:
            return None
        return self.t.Vector(o), self.t.VectorLen(o)


def _root(buf) -> _Tab:
    return _Tab(buf, flatbuffers.encode.Get(_N.UOffsetTFlags.packer_type, buf, 0))


def read_metadata_buffer(data: bytes) -> bytes | None:
    """The raw ``TFLITE_METADATA`` buffer (a ModelMetadata flatbuffer) of a .tflite, or None."""
    if len(data) < 8 or data[4:8] != TFLITE_FILE_IDENTIFIER:
        return None
    model = _root(data)
    # Model{version 0, operator_codes 1, subgraphs 2, description 3, buffers 4, metadata_buffer 5,
    #   metadata 6, signature_defs 7}; Metadata{name 0, buffer 1}; Buffer{data 0, offset 1, size 2}
    buffers = model.tables(4)
    for entry in model.tables(6):
        if entry.string(0) != METADATA_NAME:
            continue
        index = entry.scalar(1, _N.Uint32Flags)
        if index >= len(buffers):
            return None
        buffer = buffers[index]
        span = buffer.byte_range(0)
        if span is not None and span[1]:
            start, length = span
            return bytes(data[start:start + length])
        offset, size = buffer.scalar(1, _N.Uint64Flags), buffer.scalar(2, _N.Uint64Flags)
        if offset > 1 and size:
            return bytes(data[offset:offset + size])
        return None
    return None


def _parse_tensor(tensor: _Tab | None) -> dict:
    if tensor is None:
        return {}
    info = {"name": tensor.string(0), "description": tensor.string(1)}
    content = tensor.table(3)
    if content is not None and content.scalar(0, _N.Uint8Flags) == IMAGE_PROPERTIES:
        image = content.table(1)
        color = image.scalar(0, _N.Int8Flags) if image is not None else 0
        size = image.table(1) if image is not None else None
        info["color_space"] = _COLOR_SPACES.get(color, str(color))
        info["width"] = size.scalar(0, _N.Uint32Flags) if size is not None else None
        info["height"] = size.scalar(1, _N.Uint32Flags) if size is not None else None
    stats = tensor.table(5)
    if stats is not None:
        info["stats"] = {"max": stats.floats(0), "min": stats.floats(1)}
    info["associated_files"] = [
        {"name": f.string(0), "type": _ASSOCIATED_FILE_TYPES.get(f.scalar(2, _N.Int8Flags), "UNKNOWN")}
        for f in tensor.tables(6)
    ]
    return info


def read_metadata(tflite_path_or_bytes) -> dict | None:
    """Parse the metadata back (without mediapipe).

    Returns ``{"name", "description", "version", "min_parser_version", "input": {"name",
    "description", "color_space", "width", "height", ...}, "output": {"name", "description",
    "associated_files": [{"name", "type"}], ...}, "labels"}`` where ``labels`` is read from the
    zip entry that the output's TENSOR_AXIS_LABELS file names (None when it is missing); None
    when the file has no TFLite metadata.
    """
    if isinstance(tflite_path_or_bytes, (bytes, bytearray, memoryview)):
        data = bytes(tflite_path_or_bytes)
    else:
        data = Path(tflite_path_or_bytes).read_bytes()
    raw = read_metadata_buffer(data)
    if raw is None or raw[4:8] != METADATA_FILE_IDENTIFIER:
        return None
    root = _root(raw)
    subgraphs = root.tables(3)
    subgraph = subgraphs[0] if subgraphs else None
    inputs = subgraph.tables(2) if subgraph is not None else []
    outputs = subgraph.tables(3) if subgraph is not None else []
    result = {
        "name": root.string(0),
        "description": root.string(1),
        "version": root.string(2),
        "min_parser_version": root.string(7),
        "input": _parse_tensor(inputs[0] if inputs else None),
        "output": _parse_tensor(outputs[0] if outputs else None),
    }
    label_files = [f["name"] for f in result["output"].get("associated_files", []) if f["type"] == "TENSOR_AXIS_LABELS"]
    result["labels"] = read_zip_labels(data, label_files[0]) if label_files else None
    return result


def read_zip_labels(data: bytes, name: str) -> list[str] | None:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            text = archive.read(name).decode("utf-8")
    except (zipfile.BadZipFile, KeyError):
        return None
    return [line.strip() for line in text.splitlines() if line.strip()]
