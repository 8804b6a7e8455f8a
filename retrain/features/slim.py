"""A module's slim copy: its own SavedModel cut down to the inference function, cached per fingerprint.

A published module holds every function it was saved with: MobileNetV2 0.35 has 627 (each Keras
layer's call, for training and inference, with and without losses), and loading rebuilds every
function of the library, even TensorFlow's ``load_partial`` of only ``__call__`` (2.1-2.6 s here,
3-3.5 s for ``tf.saved_model.load``), although extraction and export call one.

The slim copy is the module's ``saved_model.pb`` with its function library cut to what
``__call__``'s inference traces reach (its ``training=True`` traces, the other layers' functions,
the signatures and the writer's checkpoint functions are dropped, and the object graph's edges to
them), beside a copy of the module's variables files. Nothing is traced, saved or converted: the
functions kept are the module's own, byte for byte, and the variables its own bytes, so the copy
runs the module's computation exactly. Cutting and writing it takes 0.03-0.1 s, and loading it
0.5 s. Made in ``CACHE/slim/`` on the first load of a fingerprint; every later run loads it too.

Trust: the copy is found by the module's fingerprint (SHA-256 of its files, the same key as the
bottlenecks'), its own files must have the fingerprint recorded when it was made, and it goes
through the same op audit as any module. A copy whose files changed is ignored and made anew; a
copy that cannot be loaded (a ``__call__`` that needs objects beyond the variable lists) is
recorded as rejected and the module itself is loaded, then and in every later run.
Fine-tuning and ``module export`` load the module itself: they need its training function.

Written without deleting anything: the copy goes to a folder of its own name (a uuid), and the
record naming it (``<fingerprint>.json``) is written atomically; a concurrent run that made
another copy leaves its folder unreferenced, never half-written.
"""

from __future__ import annotations

import json
import shutil
import uuid
from datetime import datetime, timezone
from pathlib import Path

from ..errors import ModuleError, first_line
from .audit import _reachable, audit_module, read_saved_model

SLIM_FOLDER = "slim"  # in the cache folder (safety.py knows its names)
SLIM_VERSION = 3


def _record_path(cache_dir, digest: str) -> Path:
    return Path(cache_dir).expanduser() / SLIM_FOLDER / f"{digest[:32]}.json"


def _is_training_trace(graph, name: str) -> bool:
    """A trace of ``__call__`` for ``training=True`` (a positional or keyword bool that is true)."""
    signature = graph.concrete_functions[name].canonicalized_input_signature

    def true_bool(value) -> bool:
        kind = value.WhichOneof("kind")
        if kind == "bool_value":
            return value.bool_value
        if kind in ("tuple_value", "list_value"):
            return any(true_bool(v) for v in getattr(value, kind).values)
        if kind == "dict_value":
            return any(true_bool(v) for v in value.dict_value.fields.values())
        return False

    return true_bool(signature)


def slim_proto(proto):
    """The SavedModel protobuf cut to ``__call__``'s inference traces and the variable lists, or
    None when it has no ``__call__`` to keep (then the module is loaded another way)."""
    from .module import PartialModule

    meta_graph = proto.meta_graphs[0]
    graph = meta_graph.object_graph_def
    library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    if not graph.nodes:
        return None
    children = {c.local_name: c.node_id for c in graph.nodes[0].children}
    if "__call__" not in children or graph.nodes[children["__call__"]].WhichOneof("kind") != "function":
        return None
    call = graph.nodes[children["__call__"]].function
    traces = [n for n in call.concrete_functions if n in library and not _is_training_trace(graph, n)]
    if not traces:
        return None
    nodes = _held_objects(graph, [children[name] for name in PartialModule.PARTS if name in children])
    start = _functions_held(graph, nodes - {children["__call__"]}) | set(traces)
    start -= set(call.concrete_functions) - set(traces)  # __call__'s training traces (its trace_N children)
    keep = _reachable(sorted(start & set(library)), library)
    _replace(call.concrete_functions, traces)
    _drop_edges(graph, nodes, keep)
    _prune_library(meta_graph.graph_def.library, keep)
    for name in list(graph.concrete_functions):
        if name not in keep:
            del graph.concrete_functions[name]
    meta_graph.signature_def.clear()  # their functions are gone
    return proto


def _replace(field, kept: list) -> None:
    """A repeated protobuf field set to ``kept`` (its own items, filtered)."""
    if len(kept) != len(field):
        del field[:]
        field.extend(kept)


def _held_objects(graph, roots: list[int]) -> set[int]:
    """The object graph's nodes reachable from ``roots`` through their children (the variables)."""
    nodes, todo = set(), list(roots)
    while todo:
        index = todo.pop()
        if index not in nodes:
            nodes.add(index)
            todo.extend(c.node_id for c in graph.nodes[index].children)
    return nodes


def _functions_held(graph, nodes) -> set[str]:
    """The concrete functions that objects among ``nodes`` hold (regularization losses, say)."""
    held = set()
    for index in nodes:
        node = graph.nodes[index]
        kind = node.WhichOneof("kind")
        if kind == "function":
            held.update(node.function.concrete_functions)
        elif kind == "bare_concrete_function":
            held.add(node.bare_concrete_function.concrete_function_name)
    return held


def _drop_edges(graph, nodes, keep: set[str]) -> None:
    """No edge from a kept object to a function that is gone."""

    def dropped(index: int) -> bool:
        node = graph.nodes[index]
        kind = node.WhichOneof("kind")
        if kind == "bare_concrete_function":
            return node.bare_concrete_function.concrete_function_name not in keep
        return kind == "function" and not any(n in keep for n in node.function.concrete_functions)

    for index in nodes:
        node = graph.nodes[index]
        for field in (node.children, node.dependencies):
            _replace(field, [ref for ref in field if not dropped(ref.node_id)])


def _prune_library(functions, keep: set[str]) -> None:
    """The function library with only the ``keep`` functions and their gradients."""
    _replace(functions.function, [f for f in functions.function if f.signature.name in keep])
    _replace(functions.gradient, [g for g in functions.gradient if g.function_name in keep and g.gradient_func in keep])
    _replace(functions.registered_gradients, [g for g in functions.registered_gradients if g.gradient_func in keep])


def _record(path: Path) -> dict:
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def make_slim(cache_dir, module_path: Path, digest: str) -> Path | None:
    """Write the slim copy of the module at ``module_path`` (fingerprint ``digest``) and its record;
    returns the copy's folder, or None when the module has no ``__call__`` to keep or a copy of it
    was rejected before."""
    from ..files import write_atomic
    from ..safety import ensure_cache
    from .module import fingerprint

    root = Path(cache_dir).expanduser()
    path = _record_path(root, digest)
    if _record(path).get("rejected") is not None:
        return None  # a copy of this module could not stand for it once: not tried again
    proto = slim_proto(read_saved_model(module_path))
    if proto is None:
        return None
    ensure_cache(root)
    folder = root / SLIM_FOLDER / f"{digest[:16]}-{uuid.uuid4().hex}"
    (folder / "variables").mkdir(parents=True)
    for file in sorted((module_path / "variables").iterdir()):
        if file.is_file():
            shutil.copyfile(file, folder / "variables" / file.name)
    (folder / "saved_model.pb").write_bytes(proto.SerializeToString())
    record = {"version": SLIM_VERSION, "module_fingerprint": digest, "folder": folder.name,
              "files_fingerprint": fingerprint(folder),
              "functions": len(proto.meta_graphs[0].graph_def.library.function),
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_atomic(path, json.dumps(record, indent=1) + "\n")
    return folder


def reject_slim(cache_dir, digest: str, reason: str) -> None:
    """Record that this module's copy cannot stand for it: the module itself is loaded from now on."""
    from ..files import write_atomic

    path = _record_path(cache_dir, digest)
    write_atomic(path, json.dumps({"version": SLIM_VERSION, "module_fingerprint": digest,
                                   "rejected": {"reason": reason, "folder": _record(path).get("folder")}}) + "\n")


def slim_folder(cache_dir, handle: str, digest: str, allowed_ops):
    """The module's intact slim copy and its audit, or None when there is none (or it was rejected)."""
    from .module import fingerprint

    path = _record_path(cache_dir, digest)
    record = _record(path)
    try:
        if (record.get("version") != SLIM_VERSION or record.get("module_fingerprint") != digest
                or record.get("rejected") is not None):
            return None
        folder = path.parent / str(record["folder"])
        if "/" in record["folder"] or not folder.is_dir() or fingerprint(folder) != record["files_fingerprint"]:
            return None
    except (OSError, KeyError, TypeError):
        return None
    try:
        return folder, audit_module(folder, handle, allowed_ops)  # it is a SavedModel too: audited like any
    except ModuleError:
        return None


def load_slim_copy(cache_dir, handle: str, module_path: Path, digest: str, allowed_ops):
    """The module's slim copy (made now if there is none) loaded with ``load_partial``, as a
    ``module.PartialModule``, and its folder; (None, None) when there is no copy to use."""
    from .module import PartialModule

    found = slim_folder(cache_dir, handle, digest, allowed_ops)
    if found is None and make_slim(cache_dir, module_path, digest) is not None:
        found = slim_folder(cache_dir, handle, digest, allowed_ops)
    if found is None:
        return None, None
    folder, audit = found
    try:
        return PartialModule.load(folder, audit.root_children), folder
    except Exception as error:  # e.g. a __call__ that needs objects beyond the variable lists
        reject_slim(cache_dir, digest, f"it cannot be loaded alone: {first_line(error)[:200]}")
        return None, None


__all__ = ["SLIM_FOLDER", "load_slim_copy", "make_slim", "reject_slim", "slim_folder", "slim_proto"]
