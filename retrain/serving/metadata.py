"""TFLite metadata for image classifiers: labels and descriptions inside the .tflite file.

On-device tooling (MediaPipe Tasks, the TFLite Support Task Library, Android Studio's ML model
binding) reads labels from *TFLite metadata*: a ``ModelMetadata`` flatbuffer (file identifier
``M001``, schema ``metadata_schema.fbs``) stored in a model buffer that the model's ``metadata``
list names ``TFLITE_METADATA``. The output tensor's metadata lists an associated file
``labels.txt`` of type ``TENSOR_AXIS_LABELS``, and that file is packed into the .tflite as a zip
entry appended after the flatbuffer. Interpreters ignore both.

``tflite-support`` (which ships a writer) does not install beside this TensorFlow, and MediaPipe
is far too heavy a dependency, so the metadata flatbuffer is written here by hand with the
``flatbuffers`` Builder, following metadata_schema.fbs (field ids checked against MediaPipe's
generated ``metadata_schema_py_generated``). The model flatbuffer itself is rewritten with
ai-edge-litert's TFLite schema (object API); reading needs only ``flatbuffers``.
"""

from __future__ import annotations

import io
import zipfile

import flatbuffers
from flatbuffers import number_types as _N

METADATA_NAME = "TFLITE_METADATA"  # the model metadata entry on-device tools look for
METADATA_FILE_IDENTIFIER = b"M001"
TFLITE_FILE_IDENTIFIER = b"TFL3"
LABELS_FILE = "labels.txt"
MIN_PARSER_VERSION = "1.0.0"  # every field written here exists since metadata schema 1.0.0
INPUT_NAME = "image"
OUTPUT_NAME = "probability"

# metadata_schema.fbs enums
TENSOR_AXIS_LABELS = 2  # AssociatedFileType
RGB = 1  # ColorSpaceType
FEATURE_PROPERTIES = 1  # ContentProperties union
IMAGE_PROPERTIES = 2

_ASSOCIATED_FILE_TYPES = {0: "UNKNOWN", 1: "DESCRIPTIONS", 2: "TENSOR_AXIS_LABELS", 3: "TENSOR_VALUE_LABELS",
                          4: "TENSOR_AXIS_SCORE_CALIBRATION", 5: "VOCABULARY", 6: "SCANN_INDEX_FILE"}
_COLOR_SPACES = {0: "UNKNOWN", 1: "RGB", 2: "GRAYSCALE"}

# TFLite schema tensor types (schema.fbs TensorType) that the stats below cover
_FLOAT32, _UINT8, _INT8 = 0, 3, 9

# Buffer.data in schema.fbs is (force_align: 16): the rewritten model keeps every buffer 16-byte aligned
# (the Python converter's own output was measured not to be; interpreters accept both).
_BUFFER_ALIGNMENT = 16


# ----------------------------------------------------------------------------------------------
# writing


def add_metadata(
    flatbuffer: bytes,
    labels: list[str],
    *,
    height: int,
    width: int,
    name: str,
    description: str,
    version: str,
    input_description: str,
    output_description: str,
    signature: tuple[str, str, str] | None = None,
) -> bytes:
    """Return a new .tflite (bytes) with TFLite metadata for an image classifier + labels.txt packed inside as a zip entry.

    ``signature`` (key, input name, output name): a SignatureDef for the model's one input and
    output, added when the model has none (a frozen-graph conversion writes none; a SavedModel
    conversion's own is kept).

    ``flatbuffer`` is a converted model: one subgraph, one image input [1, height, width, 3] (RGB,
    uint8 needs no normalization), one output of class scores [1, len(labels)]. A ``TFLITE_METADATA``
    entry already there is replaced; a zip already appended to the input is dropped (the flatbuffer
    is rewritten and a new zip holding only labels.txt is appended).

    Raises ImportError, saying so, when ai-edge-litert (the TFLite schema) is missing.
    """
    try:
        from ai_edge_litert import schema_py_generated as schema
    except ImportError as error:
        raise ImportError("writing TFLite metadata needs ai-edge-litert (its TFLite flatbuffer schema)") from error
    labels = _checked_labels(labels)
    data = bytes(flatbuffer)
    if data[4:8] != TFLITE_FILE_IDENTIFIER:
        raise ValueError("not a TFLite flatbuffer (file identifier is not TFL3)")
    model = _unpack_model(data, schema)
    graph, input_tensor, output_tensor = _classifier_tensors(model, len(labels))

    metadata = _build_model_metadata(
        labels_file=LABELS_FILE,
        height=int(height),
        width=int(width),
        name=name,
        description=description,
        version=version,
        input_description=input_description,
        output_description=output_description,
        input_type=int(input_tensor.type),
        output_type=int(output_tensor.type),
    )

    if signature is not None and not model.signatureDefs:
        _add_signature(model, schema, graph, signature)

    _put_metadata(model, schema, metadata)
    packed = _pack_model(model, schema)
    out = io.BytesIO()
    out.write(packed)
    with zipfile.ZipFile(out, "a", compression=zipfile.ZIP_STORED) as archive:
        archive.writestr(LABELS_FILE, "\n".join(labels) + "\n")
    return out.getvalue()


def _checked_labels(labels) -> list[str]:
    labels = [str(label) for label in labels]
    if not labels:
        raise ValueError("labels must not be empty")
    for label in labels:
        if not label or "\n" in label or "\r" in label:
            raise ValueError(f"label {label!r} cannot be written as one line of labels.txt")
    return labels


def _classifier_tensors(model, n_labels: int):
    """(subgraph, input tensor, output tensor) of an image classifier with ``n_labels`` classes."""
    if not model.subgraphs:
        raise ValueError("the model has no subgraph")
    graph = model.subgraphs[0]
    if len(graph.inputs) != 1 or len(graph.outputs) != 1:
        raise ValueError(
            f"an image classifier has one input and one output; this model has "
            f"{len(graph.inputs)} and {len(graph.outputs)}")
    input_tensor = graph.tensors[graph.inputs[0]]
    output_tensor = graph.tensors[graph.outputs[0]]
    output_shape = [int(d) for d in (output_tensor.shape if output_tensor.shape is not None else [])]
    if output_shape and output_shape[-1] != n_labels:
        raise ValueError(f"the output has {output_shape[-1]} classes but {n_labels} labels were given")
    return graph, input_tensor, output_tensor


def _put_metadata(model, schema, metadata: bytes) -> None:
    """Store ``metadata`` in a model buffer named TFLITE_METADATA (replacing one written before)."""
    buffer = schema.BufferT()
    buffer.data = metadata
    model.buffers = list(model.buffers or [])
    entries = [entry for entry in (model.metadata or []) if _text(entry.name) != METADATA_NAME]
    old = [int(entry.buffer) for entry in model.metadata or [] if _text(entry.name) == METADATA_NAME]
    in_use = {int(tensor.buffer) for subgraph in model.subgraphs for tensor in subgraph.tensors or []}
    in_use |= {int(entry.buffer) for entry in entries}
    if old and 0 < old[0] < len(model.buffers) and old[0] not in in_use:
        index = old[0]  # metadata written before: overwrite it in place
        model.buffers[index] = buffer
    else:
        model.buffers.append(buffer)
        index = len(model.buffers) - 1
    entry = schema.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = index
    model.metadata = entries + [entry]


def _add_signature(model, schema, graph, signature: tuple[str, str, str]) -> None:
    key, input_name, output_name = signature
    model.signatureDefs = [_signature_def(schema, key, (input_name, graph.inputs[0]), (output_name, graph.outputs[0]))]
    _tidy_tensor_names(model)


def _tidy_tensor_names(model) -> None:
    """A frozen-graph conversion names each fused tensor after its ops twice (once more under the
    ``StatefulPartitionedCall/...`` scopes of the frozen call) and sometimes after a numbered node
    that changes from process to process. Keep the plain op names, as a SavedModel conversion
    writes them: files are about 45 KB smaller and the names stable between runs."""
    for subgraph in model.subgraphs or []:
        for tensor in subgraph.tensors or []:
            name = _text(tensor.name) or ""
            parts = [p for p in name.split(";") if p and not p.startswith("StatefulPartitionedCall") and not p.isdigit()]
            tidy = ";".join(dict.fromkeys(parts))
            if tidy and tidy != name:
                tensor.name = tidy


def _signature_def(schema, key: str, input_map: tuple[str, int], output_map: tuple[str, int]):
    def tensor_map(name, index):
        entry = schema.TensorMapT()
        entry.name, entry.tensorIndex = name, int(index)
        return entry

    definition = schema.SignatureDefT()
    definition.signatureKey = key
    definition.subgraphIndex = 0
    definition.inputs = [tensor_map(*input_map)]
    definition.outputs = [tensor_map(*output_map)]
    return definition


def _text(value) -> str | None:
    return value.decode("utf-8") if isinstance(value, (bytes, bytearray)) else value


def _unpack_model(data: bytes, schema):
    """The model as a ``ModelT``, everything kept as it is (buffer indices included); data that
    the converter placed after the flatbuffer (buffer / custom option offsets, used for models
    over 2 GB) is moved inline, as ai-edge-litert's flatbuffer_utils does."""
    import numpy as np

    model = schema.ModelT.InitFromObj(schema.Model.GetRootAs(data, 0))
    for buffer in model.buffers or []:
        if buffer.offset and buffer.offset > 1:
            buffer.data = np.frombuffer(data, dtype=np.uint8, count=buffer.size, offset=buffer.offset)
            buffer.offset = 0
            buffer.size = 0
    for subgraph in model.subgraphs or []:
        for op in subgraph.operators or []:
            if getattr(op, "largeCustomOptionsOffset", 0) and op.largeCustomOptionsOffset > 1:
                start, size = op.largeCustomOptionsOffset, op.largeCustomOptionsSize
                op.customOptions = np.frombuffer(data, dtype=np.uint8, count=size, offset=start)
                op.largeCustomOptionsOffset = 0
                op.largeCustomOptionsSize = 0
    return model


def _pack_model(model, schema) -> bytes:
    """Pack a ``ModelT`` with every buffer's data 16-byte aligned (as schema.fbs asks)."""
    import numpy as np

    class _AlignedBufferT(schema.BufferT):
        def Pack(self, builder):  # noqa: N802 - flatbuffers' naming
            data_offset = None
            if self.data is not None:
                if isinstance(self.data, (bytes, bytearray, memoryview)):
                    array = np.frombuffer(self.data, dtype=np.uint8)
                else:
                    array = np.ascontiguousarray(np.asarray(self.data, dtype=np.uint8).reshape(-1))
                builder.StartVector(1, array.size, _BUFFER_ALIGNMENT)
                builder.head = builder.head - array.size
                builder.Bytes[builder.head:builder.head + array.size] = array.tobytes()
                builder.vectorNumElems = array.size
                data_offset = builder.EndVector()
            schema.BufferStart(builder)
            if data_offset is not None:
                schema.BufferAddData(builder, data_offset)
            schema.BufferAddOffset(builder, self.offset or 0)
            schema.BufferAddSize(builder, self.size or 0)
            return schema.BufferEnd(builder)

    for index, buffer in enumerate(model.buffers):
        aligned = _AlignedBufferT()
        aligned.__dict__.update(buffer.__dict__)
        model.buffers[index] = aligned
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_FILE_IDENTIFIER)
    return bytes(builder.Output())


class _Writer:
    """A flatbuffers Builder with the few table and vector writers the metadata schema needs."""

    def __init__(self):
        self.b = flatbuffers.Builder(1024)

    def string(self, value):
        return self.b.CreateString(value) if value is not None else None

    def table(self, num_fields, fields):
        """fields: (slot, kind, value) with kind "offset", "int8", "uint8" or "uint32"; None values skipped."""
        b = self.b
        b.StartObject(num_fields)
        for slot, kind, value in fields:
            if value is None:
                continue
            if kind == "offset":
                b.PrependUOffsetTRelativeSlot(slot, _N.UOffsetTFlags.py_type(value), 0)
            elif kind == "int8":
                b.PrependInt8Slot(slot, value, 0)
            elif kind == "uint8":
                b.PrependUint8Slot(slot, value, 0)
            elif kind == "uint32":
                b.PrependUint32Slot(slot, value, 0)
            else:  # pragma: no cover
                raise AssertionError(kind)
        return b.EndObject()

    def offsets(self, offsets):
        self.b.StartVector(4, len(offsets), 4)
        for offset in reversed(offsets):
            self.b.PrependUOffsetTRelative(offset)
        return self.b.EndVector()

    def floats(self, values):
        self.b.StartVector(4, len(values), 4)
        for value in reversed(values):
            self.b.PrependFloat32(float(value))
        return self.b.EndVector()

    def stats(self, tensor_type, float_range):
        """Stats{max:[float] (0), min:[float] (1)}: the value range, as MediaPipe's writers record it."""
        if tensor_type == _UINT8:
            low, high = 0.0, 255.0
        elif tensor_type == _INT8:
            low, high = -128.0, 127.0
        elif tensor_type == _FLOAT32 and float_range is not None:
            low, high = float_range
        else:
            return None
        maximum, minimum = self.floats([high]), self.floats([low])
        return self.table(2, [(0, "offset", maximum), (1, "offset", minimum)])


def _input_metadata(w: _Writer, height: int, width: int, description: str, input_type: int):
    # TensorMetadata{name 0, description 1, dimension_names 2, content 3, process_units 4, stats 5,
    #   associated_files 6}; Content{content_properties_type 0, content_properties 1, range 2};
    #   ImageProperties{color_space 0, default_size 1}; ImageSize{width 0, height 1}
    name, text = w.string(INPUT_NAME), w.string(description)
    image_size = w.table(2, [(0, "uint32", width), (1, "uint32", height)])
    image_properties = w.table(2, [(0, "int8", RGB), (1, "offset", image_size)])
    content = w.table(3, [(0, "uint8", IMAGE_PROPERTIES), (1, "offset", image_properties)])
    stats = w.stats(input_type, None)  # float input: no normalization is recorded, so no range
    return w.table(7, [(0, "offset", name), (1, "offset", text), (3, "offset", content), (5, "offset", stats)])


def _output_metadata(w: _Writer, labels_file: str, description: str, output_type: int):
    # probabilities over the labels; AssociatedFile{name 0, description 1, type 2, locale 3, version 4}
    file_name = w.string(labels_file)
    file_desc = w.string("Labels for categories that the model can recognize.")
    labels_entry = w.table(5, [(0, "offset", file_name), (1, "offset", file_desc), (2, "int8", TENSOR_AXIS_LABELS)])
    files = w.offsets([labels_entry])
    name, text = w.string(OUTPUT_NAME), w.string(description)
    content = w.table(3, [(0, "uint8", FEATURE_PROPERTIES), (1, "offset", w.table(0, []))])
    stats = w.stats(output_type, (0.0, 1.0))
    return w.table(7, [(0, "offset", name), (1, "offset", text), (3, "offset", content), (5, "offset", stats),
                       (6, "offset", files)])


def _build_model_metadata(*, labels_file, height, width, name, description, version, input_description,
                          output_description, input_type, output_type) -> bytes:
    """The ModelMetadata flatbuffer (metadata_schema.fbs), written field by field."""
    w = _Writer()
    input_metadata = _input_metadata(w, height, width, input_description, input_type)
    output_metadata = _output_metadata(w, labels_file, output_description, output_type)
    # SubGraphMetadata{name 0, description 1, input_tensor_metadata 2, output_tensor_metadata 3, ...(10 fields)}
    inputs, outputs = w.offsets([input_metadata]), w.offsets([output_metadata])
    subgraph = w.table(10, [(2, "offset", inputs), (3, "offset", outputs)])
    # ModelMetadata{name 0, description 1, version 2, subgraph_metadata 3, author 4, license 5,
    #   associated_files 6, min_parser_version 7}
    model_name, model_desc, model_version = w.string(name), w.string(description), w.string(version)
    subgraphs = w.offsets([subgraph])
    parser_version = w.string(MIN_PARSER_VERSION)
    root = w.table(8, [(0, "offset", model_name), (1, "offset", model_desc), (2, "offset", model_version),
                       (3, "offset", subgraphs), (7, "offset", parser_version)])
    w.b.Finish(root, file_identifier=METADATA_FILE_IDENTIFIER)
    return bytes(w.b.Output())


__all__ = ["add_metadata", "METADATA_NAME", "LABELS_FILE"]
