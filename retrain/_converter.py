"""``tf.lite.TFLiteConverter.from_concrete_functions``, frozen without rebuilding a function.

The converter freezes a concrete function (its variables made constants) before converting it,
and its freezing builds a new concrete function from the frozen GraphDef, copying every op
through Python (``lift_to_graph``), only to read its input and output tensors. For MobileNetV2
0.35 that copy is 1.4 s of a 2.1 s conversion (cProfile), all of it holding the GIL, which the
decoding and the extraction beside it then wait for. The converter only needs the frozen
GraphDef and tensors naming its inputs and outputs: here the GraphDef is imported into a plain
graph (C++, milliseconds) and the tensors are taken from it. The flatbuffer is byte for byte the
one ``from_concrete_functions`` writes (tests/test_converter.py); conversion of the module takes
0.6-0.8 s instead of 1.3-1.8 s on a quiet core.

The frozen function itself is used by the converter only for Grappler passes, which run only
when an option asks for them (the legacy converter, or TF Select ops alone); then, and on a
TensorFlow without the freezing steps named here, the converter freezes as it always does.
"""

from __future__ import annotations

from types import SimpleNamespace

from ._tf import tf as _tf

_CLASS = None


def _converter_class():
    global _CLASS
    if _CLASS is not None:
        return _CLASS
    tf = _tf()
    from tensorflow.python.framework import convert_to_constants as freezing

    fast = hasattr(freezing, "_FunctionConverterDataInEager") and hasattr(freezing, "_replace_variables_by_constants")

    class FrozenGraphConverter(tf.lite.TFLiteConverter):
        def _freeze_concrete_function(self):
            if not fast or self._grappler_config().graph_options.rewrite_options.optimizers or len(self._funcs) != 1:
                return super()._freeze_concrete_function()
            func = self._funcs[0]
            data = freezing._FunctionConverterDataInEager(func=func, lower_control_flow=False, aggressive_inlining=False)
            graph_def, converted = freezing._replace_variables_by_constants(converter_data=data)
            graph = tf.Graph()
            with graph.as_default():
                tf.graph_util.import_graph_def(graph_def, name="")
            # The captures made constants are no longer inputs (as in convert_to_constants).
            constants = {id(func.graph.internal_captures[index]) for index in converted}
            inputs = [graph.get_tensor_by_name(t.name) for t in func.inputs
                      if id(t) not in constants and t.dtype != tf.resource]
            outputs = [graph.get_tensor_by_name(t.name) for t in func.outputs]
            return graph_def, inputs, outputs, SimpleNamespace(graph=graph)

    _CLASS = FrozenGraphConverter
    return _CLASS


def from_concrete_function(concrete, trackable):
    """A TFLite converter of one concrete function (``trackable`` holds its variables), converting
    directly from the frozen graph (``experimental_lower_to_saved_model`` off)."""
    converter = _converter_class().from_concrete_functions([concrete], trackable)
    converter.experimental_lower_to_saved_model = False
    return converter


__all__ = ["from_concrete_function"]
