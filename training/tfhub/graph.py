"""The module's graph, checked as data: `saved_model.pb` must parse as a SavedModel whose graphs
use no op that runs code or touches files, processes or the network when executed, and
`tfhub_module.pb` (when present) must be a TF-Hub ModuleDef. Nothing here executes, imports or
unpickles anything: the bytes are walked with the hand-written wire-format reader
(s4l.training.tfhub.wire), and the import never needs the graph for anything else.

Why check a file the import does not use: a module is one artifact, and a user who imports it
will also keep, pass on or load the rest of it with TensorFlow (where the graph does run). A
module whose graph is not a SavedModel (a pickle, garbage, a truncated file) or that carries a
code-running op is hostile or damaged as a whole, so it is refused, with nothing written.

What is walked (tensorflow/core/protobuf/saved_model.proto, meta_graph.proto, framework/
graph.proto, node_def.proto, function.proto, attr_value.proto):

    SavedModel        1 saved_model_schema_version (int64), 2 meta_graphs (MetaGraphDef)
    MetaGraphDef      2 graph_def (GraphDef)
    GraphDef          1 node (NodeDef), 2 library (FunctionDefLibrary)
    FunctionDefLibrary 1 function (FunctionDef)
    FunctionDef       1 signature (OpDef: 1 name), 3 node_def (NodeDef), 5 attr
    NodeDef           1 name, 2 op, 5 attr (map entry: 1 key, 2 AttrValue)
    AttrValue         1 list (ListValue: 9 func), 10 func (NameAttrList: 1 name, 2 attr)

A `func` attr may name a primitive op as well as a library function (attr_value.proto says so:
PartitionedCall with f=PyFunc runs PyFunc without any node of that op), so function names in
attrs are checked like node ops. Every occurrence of a field is checked (protobuf merges a
repeated message field and keeps the last scalar: a second `op` cannot hide behind the first).

The refused ops are a denylist, not an allowlist: the real release modules were exported by
TensorFlow 1.x, whose op names (VariableV2 vs VarHandleOp, FusedBatchNorm vs ...V3) differ from the
fixtures' (TF 2.x) and cannot be downloaded here to check, so an allowlist could refuse the very
models the import exists for. The saver's own ops (SaveV2, RestoreV2, MergeV2Checkpoints,
ShardedFilename, ...), which TensorFlow writes into SavedModel graphs, are allowed.
"""

from __future__ import annotations

import dataclasses
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from s4l.errors import UserError
from s4l.training.tfhub.wire import LEN, VARINT, fields, int64, text

GRAPH_FILE = "saved_model.pb"
MODULE_DEF_FILE = "tfhub_module.pb"
MAX_GRAPH_BYTES = 64 << 20  # a ResNet-50 module's graph is 1-3 MB; its weights are not in it
MAX_MODULE_DEF_BYTES = 64 << 10  # a ModuleDef is a format enum and a list of feature names
MAX_DEPTH = 32  # nested func attrs (NameAttrList -> AttrValue -> NameAttrList ...)
MODULE_FORMAT_V3 = 3  # tensorflow_hub/module_def.proto: the only format there is

_RUNS_CODE = "runs Python code when executed"
_RUNS_GRAPH = "runs a serialized graph that is not part of the module's GraphDef"
_FILES = "reads or writes files when executed"
_NETWORK = "talks to other processes over the network when executed"

# Op names whose every variant is refused: an "Experimental" prefix and a "V<n>" suffix are
# stripped before looking a name up here (TFRecordReaderV2, ExperimentalCSVDataset, ...).
# Names from TF's op registry (tensorflow/core/ops/*.cc: script_ops, io_ops, dataset_ops,
# experimental_dataset_ops, summary_ops, debug_ops, lookup_ops, checkpoint_ops, functional_ops,
# rpc_ops, and tensorflow/distribute/experimental/rpc). None of them is ever part of a ResNet
# inference graph.
REFUSED_FAMILIES: dict[str, str] = {
    # code execution
    "PyFunc": _RUNS_CODE, "PyFuncStateless": _RUNS_CODE, "EagerPyFunc": _RUNS_CODE,
    "DatasetFromGraph": _RUNS_GRAPH,
    # files: plain file ops, memory-mapped constants, printing to a file
    "ReadFile": _FILES, "WriteFile": _FILES, "MatchingFiles": _FILES, "ImmutableConst": _FILES,
    # queue-based readers
    "WholeFileReader": _FILES, "TextLineReader": _FILES, "FixedLengthRecordReader": _FILES,
    "TFRecordReader": _FILES, "LMDBReader": _FILES,
    # tf.data sources and sinks on files
    "TFRecordDataset": _FILES, "TextLineDataset": _FILES, "FixedLengthRecordDataset": _FILES,
    "CSVDataset": _FILES, "SqlDataset": _FILES, "LMDBDataset": _FILES,
    "MatchingFilesDataset": _FILES, "SaveDataset": _FILES, "LoadDataset": _FILES,
    "SnapshotDataset": _FILES, "SnapshotDatasetReader": _FILES,
    "SnapshotNestedDatasetReader": _FILES, "CacheDataset": _FILES, "DatasetToTFRecord": _FILES,
    # summaries, the debugger, vocabularies and descriptors read from files
    "CreateSummaryFileWriter": _FILES, "CreateSummaryDbWriter": _FILES,
    "DebugIdentity": _FILES, "DebugNanCount": _FILES, "DebugNumericSummary": _FILES,
    "InitializeTableFromTextFile": _FILES, "GenerateVocabRemapping": _FILES,
    "LoadAndRemapMatrix": _FILES, "DecodeProto": _FILES, "EncodeProto": _FILES,
    # the network
    "Rpc": _NETWORK, "TryRpc": _NETWORK, "RpcServer": _NETWORK, "RpcClient": _NETWORK,
    "RpcServerStart": _NETWORK, "RpcServerRegister": _NETWORK, "RpcCall": _NETWORK,
    "RemoteCall": _NETWORK, "DataServiceDataset": _NETWORK, "RegisterDataset": _NETWORK,
    "DistributedSave": _NETWORK,
}
# Refused by exact name only: PrintV2's output_stream may be "file://...", Print (v1) only logs.
REFUSED_OPS: dict[str, str] = {"PrintV2": _FILES}
_VERSION = re.compile(r"V\d+$")


def _family(op: str) -> str:
    name = op[len("Experimental"):] if op.startswith("Experimental") else op
    return _VERSION.sub("", name)


def refusal(op: str) -> str | None:
    """Why `op` is refused, or None when it may appear in a module's graph."""
    return REFUSED_OPS.get(op) or REFUSED_FAMILIES.get(_family(op))


def human_size(n: int) -> str:
    if n >= 1 << 30:
        return f"{n >> 30} GiB"
    return f"{n >> 20} MiB" if n >= 1 << 20 else f"{n >> 10} KiB"


@dataclasses.dataclass
class GraphSummary:
    """What the check saw; recorded in the checkpoint's provenance."""

    meta_graphs: int = 0
    nodes: int = 0
    functions: int = 0
    ops: set[str] = dataclasses.field(default_factory=set)

    def to_dict(self) -> dict:
        return {"meta_graphs": self.meta_graphs, "nodes": self.nodes,
                "functions": self.functions, "ops": sorted(self.ops)}


class _Walker:
    def __init__(self, where: str, data: bytes):
        self.where = where
        self.summary = GraphSummary()
        # A refused op's name holds its family's name (or is an exact one), and a string field
        # lies verbatim in the file: when none of them occurs anywhere, no attr can name one and
        # the attrs need not be walked (the nodes still are). Otherwise everything is.
        self.deep = any(n.encode() in data for n in (*REFUSED_FAMILIES, *REFUSED_OPS))

    def bad(self) -> str:
        return f"{self.where} does not parse as a SavedModel"

    def refuse(self, op: str, reason: str, node: str, function: str | None, how: str) -> None:
        inside = f" in function {function!r}" if function else ""
        raise UserError(f"{self.where}: node {node!r}{inside} {how} {op!r}, which {reason}; a "
                        "release module's ResNet graph never does (refusing the module)")

    def _expect(self, wire: int, want: int, field: str) -> None:
        if wire != want:
            raise UserError(f"{self.bad()}: {field} has wire type {wire}, not {want}")

    def saved_model(self, data: memoryview) -> GraphSummary:
        for field, wire, v in fields(data, self.bad):
            if field == 1:
                self._expect(wire, VARINT, "saved_model_schema_version")
                version = int64(v)  # type: ignore[arg-type]
                if version not in (0, 1):
                    raise UserError(f"{self.where}: SavedModel schema version {version} "
                                    "(1 expected)")
            elif field == 2:
                self._expect(wire, LEN, "a meta graph")
                self.meta_graph(v)  # type: ignore[arg-type]
            else:  # the SavedModel message has had these two fields only, since 2016
                raise UserError(f"{self.bad()}: field {field} is not part of a SavedModel")
        if self.summary.meta_graphs == 0:
            raise UserError(f"{self.bad()}: it holds no MetaGraphDef")
        return self.summary

    def meta_graph(self, buf: memoryview) -> None:
        self.summary.meta_graphs += 1
        graphs = 0
        for field, wire, v in fields(buf, self.bad):
            if field == 2:
                self._expect(wire, LEN, "a graph_def")
                graphs += 1
                self.graph(v)  # type: ignore[arg-type]
        if not graphs:
            raise UserError(f"{self.bad()}: meta graph {self.summary.meta_graphs} has no graph")

    def graph(self, buf: memoryview) -> None:
        for field, wire, v in fields(buf, self.bad):
            if field == 1:
                self._expect(wire, LEN, "a node")
                self.node(v, None)  # type: ignore[arg-type]
            elif field == 2:
                self._expect(wire, LEN, "a function library")
                for f2, w2, v2 in fields(v, self.bad):  # type: ignore[arg-type]
                    if f2 == 1:
                        self._expect(w2, LEN, "a function")
                        self.function(v2)  # type: ignore[arg-type]

    def function(self, buf: memoryview) -> None:
        self.summary.functions += 1
        name = f"#{self.summary.functions}"
        for field, wire, v in fields(buf, self.bad):  # the signature first: name the errors
            if field == 1 and wire == LEN:
                for f2, w2, v2 in fields(v, self.bad):  # type: ignore[arg-type]
                    if f2 == 1 and w2 == LEN:
                        name = text(v2, self.bad)  # type: ignore[arg-type]
        for field, wire, v in fields(buf, self.bad):
            if field == 1:
                self._expect(wire, LEN, "a function signature")
            elif field == 3:
                self._expect(wire, LEN, "a function body node")
                self.node(v, name)  # type: ignore[arg-type]
            elif field == 5 and self.deep:
                self._expect(wire, LEN, "a function attr")
                self.attr_entry(v, f"(attrs of {name})", None, 0)  # type: ignore[arg-type]

    def node(self, buf: memoryview, function: str | None) -> None:
        self.summary.nodes += 1
        name, ops, attrs = f"#{self.summary.nodes}", [], []
        for field, wire, v in fields(buf, self.bad):
            if field == 1:
                self._expect(wire, LEN, "a node name")
                name = text(v, self.bad)  # type: ignore[arg-type]
            elif field == 2:
                self._expect(wire, LEN, "a node op")
                ops.append(text(v, self.bad))  # type: ignore[arg-type]
            elif field == 5:
                self._expect(wire, LEN, "a node attr")
                attrs.append(v)
        if not ops or not all(ops):
            raise UserError(f"{self.bad()}: node {name!r} has no op")
        for op in ops:
            reason = refusal(op)
            if reason:
                self.refuse(op, reason, name, function, "uses op")
            self.summary.ops.add(op)
        if self.deep:
            for a in attrs:
                self.attr_entry(a, name, function, 0)

    def attr_entry(self, buf: memoryview, node: str, function: str | None, depth: int) -> None:
        for field, wire, v in fields(buf, self.bad):
            if field == 2:
                self._expect(wire, LEN, "an attr value")
                self.attr_value(v, node, function, depth)  # type: ignore[arg-type]

    def attr_value(self, buf: memoryview, node: str, function: str | None, depth: int) -> None:
        if depth > MAX_DEPTH:
            raise UserError(f"{self.bad()}: attrs of node {node!r} nest more than {MAX_DEPTH} "
                            "levels deep")
        for field, wire, v in fields(buf, self.bad):
            if field == 10:
                self._expect(wire, LEN, "a func attr")
                self.func(v, node, function, depth)  # type: ignore[arg-type]
            elif field == 1:
                self._expect(wire, LEN, "a list attr")
                for f2, w2, v2 in fields(v, self.bad):  # type: ignore[arg-type]
                    if f2 == 9:
                        self._expect(w2, LEN, "a func in a list attr")
                        self.func(v2, node, function, depth)  # type: ignore[arg-type]

    def func(self, buf: memoryview, node: str, function: str | None, depth: int) -> None:
        """A NameAttrList: the name may be a library function or a primitive op."""
        for field, wire, v in fields(buf, self.bad):
            if field == 1:
                self._expect(wire, LEN, "a func name")
                op = text(v, self.bad)  # type: ignore[arg-type]
                reason = refusal(op)
                if reason:
                    self.refuse(op, reason, node, function, "calls")
            elif field == 2:
                self._expect(wire, LEN, "a func attr")
                self.attr_entry(v, node, function, depth + 1)  # type: ignore[arg-type]


def check_saved_model(data: bytes, where: str) -> GraphSummary:
    """Refuse (one UserError line naming `where`) a saved_model.pb that is not a SavedModel, or
    whose graphs or functions use a refused op; else what was seen."""
    if len(data) > MAX_GRAPH_BYTES:
        raise UserError(f"{where} is {len(data)} bytes, over the {human_size(MAX_GRAPH_BYTES)} a "
                        "module's graph needs; refusing it")
    if not data:
        raise UserError(f"{where} is empty; not a SavedModel")
    return _Walker(where, data).saved_model(memoryview(data))


def check_module_def(data: bytes, where: str) -> None:
    """Refuse a tfhub_module.pb that is not a TF-Hub ModuleDef of format V3 with no required
    features (what tensorflow_hub itself accepts)."""
    bad: Callable[[], str] = lambda: f"{where} does not parse as a TF-Hub ModuleDef"  # noqa: E731
    if len(data) > MAX_MODULE_DEF_BYTES:
        raise UserError(f"{bad()}: {len(data)} bytes (a ModuleDef is a few bytes)")
    fmt, features = 0, []
    for field, wire, v in fields(data, bad):
        if field == 1 and wire == VARINT:
            fmt = int(v)  # type: ignore[arg-type]
        elif field == 2 and wire == LEN:
            features.append(text(v, bad))  # type: ignore[arg-type]
        else:
            raise UserError(f"{bad()}: field {field} (wire type {wire}) is not part of one")
    if fmt != MODULE_FORMAT_V3:
        raise UserError(f"{bad()}: format {fmt}, not FORMAT_V3 ({MODULE_FORMAT_V3})")
    if features:
        raise UserError(f"{where}: requires features {features[:3]} no TF-Hub reader knows")


def read_capped(path: Path, cap: int, what: str) -> bytes:
    """The bytes of the regular file `path`, refusing one over `cap` bytes before reading it."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise UserError(f"{what}: no {path.name} (every TF-Hub module holds its graph; a module "
                        "without one cannot be checked)") from None
    if not stat.S_ISREG(st.st_mode):
        raise UserError(f"{what}: {path} is not a regular file; refusing it")
    if st.st_size > cap:
        raise UserError(f"{what}: {path.name} is {st.st_size} bytes, over the {human_size(cap)} "
                        "limit; refusing it")
    with open(path, "rb") as f:
        data = f.read(cap + 1)
    if len(data) > cap:
        raise UserError(f"{what}: {path.name} grew past the {human_size(cap)} limit while read")
    return data
