"""The float32 TFLite file of a frozen-module run, without converting the serving graph again.

The serving graph's ``serving_fixed`` is the module's ``pixel_features`` (uint8 images, the cast
and scaling to the module's range, the module) followed by the head (a matrix product, a bias,
softmax). The module part is what extraction converts for LiteRT once per fingerprint and keeps in
the cache (features/lite.py); converting the whole serving graph again freezes and converts the
same module a second time in every run (1.5-1.9 s of a cold run's export here). ``append_head``
writes the head onto that conversion instead, as the converter writes it: a ``FULLY_CONNECTED``
with the kernel transposed to ``[classes, dim]`` and the bias, then ``SOFTMAX``, the model's one
output; the input is named ``images``. The file is checked like any other on the test split (its
agreement with the trained model and its largest probability difference), and the model's
record says how it was made. Fine-tuned runs convert the serving graph (the module changed).
"""

from __future__ import annotations

import numpy as np

MADE_FROM_MODULE = "the module's LiteRT conversion (cached per fingerprint) with the head appended"
MADE_BY_CONVERTER = "converted from the serving graph (serving_fixed)"


def append_head(module_tflite: bytes, kernel: np.ndarray, bias: np.ndarray) -> bytes:
    """``module_tflite`` (uint8 [n, H, W, 3] -> float32 [n, dim], one subgraph, one input and
    output) with ``probabilities = softmax(features @ kernel + bias)`` as its output."""
    from ai_edge_litert import schema_py_generated as schema
    from ai_edge_litert.tools import flatbuffer_utils

    model = flatbuffer_utils.convert_bytearray_to_object(bytearray(module_tflite))
    if len(model.subgraphs) != 1 or len(model.subgraphs[0].inputs) != 1 or len(model.subgraphs[0].outputs) != 1:
        raise ValueError("the module's conversion does not have one subgraph with one input and one output")
    graph = model.subgraphs[0]
    features = graph.tensors[graph.outputs[0]]
    dim, classes = kernel.shape
    if list(features.shape)[1:] != [dim] or features.type != schema.TensorType.FLOAT32 or bias.shape != (classes,):
        raise ValueError(f"the module's conversion outputs {list(features.shape)}, not [n, {dim}] float32")
    batch = int(features.shape[0])
    flexible = None if features.shapeSignature is None else [int(features.shapeSignature[0]), classes]
    build = _Builder(schema, model, graph)
    weights = build.tensor("head/kernel", [classes, dim], build.buffer(np.asarray(kernel, np.float32).T))
    offsets = build.tensor("head/bias", [classes], build.buffer(bias))
    logits = build.tensor("head/logits", [batch, classes], signature=flexible)
    probabilities = build.tensor("probabilities", [batch, classes], signature=flexible)
    dense = schema.FullyConnectedOptionsT()
    dense.fusedActivationFunction = schema.ActivationFunctionType.NONE
    build.operator(schema.BuiltinOperator.FULLY_CONNECTED, [graph.outputs[0], weights, offsets], [logits],
                   schema.BuiltinOptions.FullyConnectedOptions, dense)
    softmax = schema.SoftmaxOptionsT()
    softmax.beta = 1.0
    build.operator(schema.BuiltinOperator.SOFTMAX, [logits], [probabilities], schema.BuiltinOptions.SoftmaxOptions,
                   softmax)
    graph.outputs = np.asarray([probabilities], np.int32)
    graph.tensors[graph.inputs[0]].name = b"images"
    model.signatureDefs = []  # export_tflite's metadata step writes the serving_fixed one
    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


class _Builder:
    """Appends buffers, float32 tensors, operator codes and operators to a LiteRT model object
    (``flatbuffer_utils``'s object API) and its subgraph ``graph``; each returns the new index."""

    def __init__(self, schema, model, graph):
        self.schema, self.model, self.graph = schema, model, graph

    def buffer(self, values: np.ndarray) -> int:
        entry = self.schema.BufferT()
        entry.data = np.frombuffer(np.ascontiguousarray(values, np.float32).tobytes(), np.uint8)
        self.model.buffers.append(entry)
        return len(self.model.buffers) - 1

    def tensor(self, name: str, shape: list[int], buffer_index: int = 0, signature=None) -> int:
        entry = self.schema.TensorT()
        entry.name, entry.type, entry.buffer = name.encode(), self.schema.TensorType.FLOAT32, buffer_index
        entry.shape = np.asarray(shape, np.int32)
        entry.shapeSignature = None if signature is None else np.asarray(signature, np.int32)
        self.graph.tensors.append(entry)
        return len(self.graph.tensors) - 1

    def opcode(self, builtin: int) -> int:
        for index, code in enumerate(self.model.operatorCodes):
            if code.builtinCode == builtin and code.version == 1:
                return index
        code = self.schema.OperatorCodeT()
        code.builtinCode, code.deprecatedBuiltinCode, code.version = builtin, min(builtin, 127), 1
        self.model.operatorCodes.append(code)
        return len(self.model.operatorCodes) - 1

    def operator(self, builtin: int, inputs: list[int], outputs: list[int], options_type: int, options) -> None:
        entry = self.schema.OperatorT()
        entry.opcodeIndex = self.opcode(builtin)
        entry.inputs, entry.outputs = np.asarray(inputs, np.int32), np.asarray(outputs, np.int32)
        entry.builtinOptionsType, entry.builtinOptions = options_type, options
        self.graph.operators.append(entry)


def float32_from_module(module, cache_root, backend: dict, kernel: np.ndarray, bias: np.ndarray) -> tuple[bytes | None, str]:
    """The float32 file as ``module``'s LiteRT conversion (the one extraction ran, as its
    ``backend`` record names it, or the cached one, or made and cached now in ``cache_root``) with
    the head appended; (None, why) when that cannot be done, and the serving graph is converted instead."""
    from pathlib import Path

    from ..errors import first_line
    from ..features.lite import converted_path, write_converted

    try:
        path = Path(backend["converted"]) if backend.get("backend") == "litert" else converted_path(cache_root, module.info)
        if not path.is_file():
            path, _ = write_converted(module, cache_root)
        return append_head(path.read_bytes(), kernel, bias), MADE_FROM_MODULE
    except Exception as error:  # noqa: BLE001 - any converter or flatbuffer problem: the serving graph is converted
        return None, f"{MADE_BY_CONVERTER}: the module's conversion could not be used ({first_line(error)})"


__all__ = ["MADE_BY_CONVERTER", "MADE_FROM_MODULE", "append_head", "float32_from_module"]
