"""Modules are programs: read which ops a SavedModel can run, without running any of it.

A SavedModel's functions are TensorFlow graphs, and a graph can hold ops that reach outside
its tensors: read or write files, list folders, print, call back into Python, talk to other
processes. Loading a SavedModel and calling it runs them. Before a module is loaded, its
``saved_model.pb`` is parsed (nothing is executed) and every function the loader or a caller
can run is walked, nested calls, loops and conditions included. An op in ``REFUSED_OPS`` is
refused with one line naming it and the function it is in, unless the user accepts it by name
(``--allow-module-op OP``, recorded in run.json).

What "every function" means: the functions the object graph exposes (``__call__``, signatures,
resource initializers and the like, which is what ``tf.saved_model.load`` restores) and the
top-level graph, which TF1-style loaders and TF Serving run. The checkpoint functions the
SavedModel writer adds for its own saver (``saver_def``) read and write the module's own
variables file: there, and only there, the checkpoint ops are expected. ``saved_model_cli scan``,
TensorFlow's own check, knows three ops (ReadFile, WriteFile, PrintV2); the table below comes
from a pass over all of TensorFlow's registered ops (tests/test_audit.py keeps it honest: every
registered op whose name suggests input/output is either refused or listed as reviewed).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from pathlib import Path

from .._tf import tf as _tf
from ..errors import ConfigError, ModuleError

_READS = "reads files"
_WRITES = "writes or deletes files"
_PRINTS = "prints or logs"
_PYTHON = "runs Python code"
_NETWORK = "talks to other processes or machines"
_MACHINE = "changes the machine's set-up"

_TABLE = {
    _READS: """
        ReadFile MatchingFiles ImmutableConst InitializeTableFromTextFile InitializeTableFromTextFileV2
        LoadAndRemapMatrix GenerateVocabRemapping Skipgram RecordInput DecodeProtoV2 EncodeProto
        Restore RestoreV2 RestoreSlice DTensorRestoreV2
        WholeFileReader WholeFileReaderV2 TextLineReader TextLineReaderV2 TFRecordReader TFRecordReaderV2
        FixedLengthRecordReader FixedLengthRecordReaderV2 IdentityReader IdentityReaderV2 LMDBReader
        ReaderRead ReaderReadV2 ReaderReadUpTo ReaderReadUpToV2 ReaderReset ReaderResetV2
        ReaderRestoreState ReaderRestoreStateV2 ReaderSerializeState ReaderSerializeStateV2
        ReaderNumRecordsProduced ReaderNumRecordsProducedV2 ReaderNumWorkUnitsCompleted ReaderNumWorkUnitsCompletedV2
        TFRecordDataset TFRecordDatasetV2 TextLineDataset FixedLengthRecordDataset FixedLengthRecordDatasetV2
        CSVDataset CSVDatasetV2 ExperimentalCSVDataset LMDBDataset ExperimentalLMDBDataset SqlDataset
        ExperimentalSqlDataset MatchingFilesDataset ExperimentalMatchingFilesDataset LoadDataset
        SnapshotDatasetReader SnapshotNestedDatasetReader SnapshotChunkDataset ListSnapshotChunksDataset
    """,
    _WRITES: """
        WriteFile Save SaveV2 SaveSlices MergeV2Checkpoints SaveDataset SaveDatasetV2 DatasetToTFRecord
        ExperimentalDatasetToTFRecord CacheDataset CacheDatasetV2 SnapshotDataset SnapshotDatasetV2 Snapshot
        DistributedSave CalibrationStatisticsSaver DumpTensor DebugIdentity DebugIdentityV2 DebugIdentityV3
        DebugNanCount DebugNumericSummary DebugNumericSummaryV2
        SummaryWriter CreateSummaryFileWriter CreateSummaryDbWriter FlushSummaryWriter CloseSummaryWriter
        ImportEvent WriteSummary WriteScalarSummary WriteHistogramSummary WriteImageSummary WriteAudioSummary
        WriteRawProtoSummary WriteGraphSummary StatsAggregatorSetSummaryWriter FileSystemSetConfiguration
    """,
    _PRINTS: "Print PrintV2",
    _PYTHON: "PyFunc PyFuncStateless EagerPyFunc GeneratorDataset",
    _NETWORK: """
        RpcClient RpcServer RpcServerRegister RpcServerStart RpcCall RpcCheckStatus RpcGetValue
        DataServiceDataset DataServiceDatasetV2 DataServiceDatasetV3 DataServiceDatasetV4
        RegisterDataset RegisterDatasetV2 RemoteCall
    """,
    _MACHINE: "ShutdownTPUSystem _DisconnectHostFromDistributedTPUSystem ConfigureDistributedTPU",
}
REFUSED_OPS: dict[str, str] = {op: reason for reason, ops in _TABLE.items() for op in ops.split()}

# The SavedModel writer's own checkpoint functions save and restore the variables file with these.
CHECKPOINT_OPS = frozenset("SaveV2 RestoreV2 MergeV2Checkpoints Save SaveSlices Restore RestoreSlice".split())
TOP_LEVEL = "the top-level graph"


class UnreadableSavedModel(ModuleError):
    """The SavedModel protobuf cannot be parsed (for a URL handle: a damaged TF Hub cache entry)."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Finding:
    op: str
    reason: str
    function: str  # the exposed function (e.g. "__call__") or the top-level graph
    inner: str | None  # the nested graph function the op is in; None: in the exposed function itself


@dataclass(frozen=True)
class AuditResult:
    functions: int  # graph functions walked
    ops: tuple[str, ...]  # every distinct op type they hold
    accepted: tuple[str, ...]  # refused ops found and accepted with --allow-module-op
    root_children: tuple[str, ...] = ()  # names of the root object's children (__call__, variables...)
    image_size: tuple | None = None  # (height, width) the module declares, None for any (declared_image_size)

    def to_dict(self) -> dict:
        return {"functions": self.functions, "distinct_ops": len(self.ops), "accepted_ops": list(self.accepted)}


def read_saved_model(path: Path, what: str = "module"):
    """The SavedModel protobuf, parsed (not loaded: nothing runs)."""
    _tf()  # TensorFlow imported the program's way (its start-up logging silenced)
    from tensorflow.core.protobuf import saved_model_pb2

    binary, text = path / "saved_model.pb", path / "saved_model.pbtxt"
    proto = saved_model_pb2.SavedModel()
    try:
        if binary.exists():
            proto.ParseFromString(binary.read_bytes())
        else:
            from google.protobuf import text_format

            text_format.Parse(text.read_text(encoding="utf-8"), proto)
    except Exception as error:  # DecodeError, ParseError, OSError
        reason = str(error).splitlines()[0][:120] if str(error).strip() else type(error).__name__
        reason = f"its protobuf cannot be parsed ({reason})"
        raise UnreadableSavedModel(f"{what} {path} cannot be loaded as a SavedModel: {reason}", reason) from None
    if not proto.meta_graphs:
        raise UnreadableSavedModel(f"{what} {path} cannot be loaded as a SavedModel: it holds no graph", "it holds no graph")
    return proto


def _callees(node, library: dict) -> set[str]:
    """The graph functions a node calls: call ops, loop and branch bodies, or an op named after a function."""
    called = {node.op} if node.op in library else set()
    for value in node.attr.values():
        if value.HasField("func"):
            called.add(value.func.name)
        if value.HasField("list"):
            called.update(f.name for f in value.list.func)
    return called & set(library)


def _exposed_functions(meta_graph) -> dict[str, str]:
    """Concrete function name -> the object path it is exposed under (``__call__``, ``signatures/x``)."""
    graph = meta_graph.object_graph_def
    paths = {0: ""}
    queue = deque([0])
    while queue:  # breadth first: the shortest path names each object
        index = queue.popleft()
        for child in graph.nodes[index].children:
            if child.node_id not in paths:
                paths[child.node_id] = f"{paths[index]}/{child.local_name}".lstrip("/")
                queue.append(child.node_id)
    exposed = {}
    for index, node in enumerate(graph.nodes):
        kind = node.WhichOneof("kind")
        names = list(node.function.concrete_functions) if kind == "function" else (
            [node.bare_concrete_function.concrete_function_name] if kind == "bare_concrete_function" else [])
        for name in names:
            exposed.setdefault(name, paths.get(index) or name)
    return exposed


def _saver_functions(meta_graph, library: dict) -> set[str]:
    """The functions the graph's saver nodes call (and all they call): the writer's checkpoint code."""
    saver = meta_graph.saver_def
    names = {saver.save_tensor_name.split(":")[0], saver.restore_op_name.split(":")[0]} - {""}
    start = [f for node in meta_graph.graph_def.node if node.name in names for f in _callees(node, library)]
    return _reachable(start, library)


def _reachable(start, library: dict) -> set[str]:
    seen, todo = set(), list(start)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(c for node in library[name].node_def for c in _callees(node, library))
    return seen


def find_refused_ops(proto) -> tuple[list[Finding], int, set[str]]:
    """Every refused op the SavedModel can run, where it is; the number of functions walked; all op types."""
    meta_graph = proto.meta_graphs[0]
    library = {f.signature.name: f for f in meta_graph.graph_def.library.function}
    saver = _saver_functions(meta_graph, library)
    exposed = _exposed_functions(meta_graph)
    findings: dict[tuple[str, str], Finding] = {}
    all_ops: set[str] = set()

    def scan(nodes, function: str, inner: str | None, checkpoint: bool) -> None:
        for node in nodes:
            all_ops.add(node.op)
            if node.op in REFUSED_OPS and not (checkpoint and node.op in CHECKPOINT_OPS):
                findings.setdefault((node.op, inner or function), Finding(node.op, REFUSED_OPS[node.op], function, inner))

    scan(meta_graph.graph_def.node, TOP_LEVEL, None, checkpoint=False)
    # Exposed functions first, so a finding names the function a caller sees; then whatever else
    # the library holds (the graph's signature nodes, the saver): nothing goes unread.
    order = [n for n in exposed if n in library] + sorted(set(library) - set(exposed))
    walked: set[str] = set()
    for root in order:
        for name in sorted(_reachable([root], library) - walked):
            walked.add(name)
            scan(library[name].node_def, exposed.get(root, root), None if name == root else name,
                 checkpoint=name in saver and root in saver)
    return list(findings.values()), len(walked), all_ops


def declared_image_size(proto) -> tuple | None:
    """(height, width) of the images the module's ``__call__`` (or its one-input default
    signature) declares, each None when any size is accepted; None when it declares no image
    input. Read from the protobuf before the module is loaded (the loaded module's own spec is
    the one that counts: module.resolve_input_spec)."""
    meta_graph = proto.meta_graphs[0]
    graph = meta_graph.object_graph_def
    shapes = []
    children = {c.local_name: c.node_id for c in graph.nodes[0].children} if graph.nodes else {}
    call = graph.nodes[children["__call__"]] if "__call__" in children else None
    if call is not None and call.WhichOneof("kind") == "function":
        for name in call.function.concrete_functions:
            signature = graph.concrete_functions[name].canonicalized_input_signature
            args = signature.tuple_value.values[0].tuple_value.values if signature.tuple_value.values else []
            if args and args[0].WhichOneof("kind") == "tensor_spec_value":
                shapes.append(args[0].tensor_spec_value.shape)
    for key in ("default", "serving_default"):
        inputs = meta_graph.signature_def[key].inputs if key in meta_graph.signature_def else {}
        if not shapes and len(inputs) == 1:
            shapes.append(next(iter(inputs.values())).tensor_shape)
    if not shapes or len(shapes[-1].dim) != 4:
        return None
    dims = [d.size for d in shapes[-1].dim]
    return (dims[1] if dims[1] > 0 else None, dims[2] if dims[2] > 0 else None)


def check_allowed_ops(ops) -> tuple[str, ...]:
    """``--allow-module-op`` names: each must be an op the audit refuses (a typo accepts nothing)."""
    import difflib

    for op in ops:
        if op not in REFUSED_OPS:
            close = difflib.get_close_matches(op, list(REFUSED_OPS), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"--allow-module-op {op}: not an op the module audit refuses{hint}; op names are case-sensitive")
    return tuple(sorted(set(ops)))


def audit_module(path: str | Path, handle: str | None = None, allowed_ops=(), what: str = "module") -> AuditResult:
    """Refuse a module whose functions hold an op that reaches outside its tensors (see the module doc).

    ``what="model"`` audits a SavedModel given to ``evaluate`` / ``predict`` the same way."""
    path = Path(path)
    proto = read_saved_model(path, what)
    findings, walked, all_ops = find_refused_ops(proto)
    allowed = set(allowed_ops)
    refused = [f for f in findings if f.op not in allowed]
    if refused:
        first = refused[0]
        where = first.function if first.inner is None else f"{first.function} (in {first.inner})"
        more = sorted({f.op for f in refused} - {first.op})
        others = f"; also {', '.join(more)}" if more else ""
        advice = (f"modules are executed code: pass --allow-module-op {first.op} only if you trust it" if what == "module"
                  else "a SavedModel is executed code: retrain runs a model with it only when its run.json "
                       "records the op as accepted (train --allow-module-op)")
        raise ModuleError(f"{what} {handle or path} is refused: {where} runs op {first.op}, which {first.reason}{others}; {advice}")
    root = proto.meta_graphs[0].object_graph_def.nodes
    children = tuple(child.local_name for child in root[0].children) if root else ()
    return AuditResult(walked, tuple(sorted(all_ops)), tuple(sorted({f.op for f in findings})), children,
                       declared_image_size(proto))


__all__ = ["REFUSED_OPS", "CHECKPOINT_OPS", "AuditResult", "Finding", "audit_module", "check_allowed_ops",
           "declared_image_size", "find_refused_ops"]
