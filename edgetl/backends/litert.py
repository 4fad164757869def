"""LiteRT (TensorFlow Lite) models: run them with the `ai-edge-litert` interpreter (XNNPACK on the CPU)
and keep edgetl's metadata in the model's own metadata table. Torch-free, TensorFlow-free: an app
needs only ai-edge-litert and numpy.

The metadata contract is the ONNX one (flat string pairs, see edgetl.metadata), stored as one JSON
object in a flatbuffer buffer named by a `Model.metadata` entry "edgetl" (the place the LiteRT
schema gives for producer data; MediaPipe's "TFLITE_METADATA" entry sits beside it the same way).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from edgetl.errors import EdgetlError
from edgetl.hostinfo import physical_cores
from edgetl.native_stderr import dropping_native_lines

METADATA_NAME = "edgetl"
TFLITE_IDENTIFIER = b"TFL3"
EXTRA_HINT = "pip install 'edgetl[litert]'"


class LiteRtLoadError(EdgetlError, ValueError):
    """A file the LiteRT interpreter cannot load (a ValueError too, like onnxruntime's load error)."""


def schema() -> Any:
    """ai-edge-litert's generated flatbuffer schema of .tflite files (torch- and TensorFlow-free)."""
    try:
        from ai_edge_litert import schema_py_generated
    except ImportError:
        raise EdgetlError(f"LiteRT models need the ai-edge-litert package: {EXTRA_HINT}") from None
    return schema_py_generated


def read_tflite(path: str | os.PathLike[str]) -> bytes:
    p = Path(path)
    if not p.is_file():
        raise LiteRtLoadError(f"no model file at {p}")
    buf = p.read_bytes()
    if len(buf) < 8 or buf[4:8] != TFLITE_IDENTIFIER:
        raise LiteRtLoadError(f"{p} is not a LiteRT (.tflite) model")
    return buf


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The edgetl metadata of a .tflite file ({} when it has none)."""
    return metadata_of(read_tflite(path), str(path))


def metadata_of(buf: bytes, path: str) -> dict[str, str]:
    """The edgetl metadata in the bytes of a .tflite file read from `path` (named in errors)."""
    try:
        model = schema().Model.GetRootAs(buf, 0)
        entries = [model.Metadata(i) for i in range(model.MetadataLength())]
        raw = next((model.Buffers(e.Buffer()).DataAsNumpy() for e in entries if e.Name() == METADATA_NAME.encode()), None)
    except EdgetlError:
        raise
    except Exception:  # a truncated or corrupt flatbuffer fails somewhere inside the generated reader
        raise LiteRtLoadError(f"{path} is not a readable LiteRT (.tflite) model (truncated or corrupt)") from None
    if raw is None:
        return {}
    try:
        meta = json.loads(bytes(raw).decode())
    except (ValueError, TypeError):
        raise LiteRtLoadError(f"{path}: its {METADATA_NAME!r} metadata is not JSON") from None
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise LiteRtLoadError(f"{path}: its {METADATA_NAME!r} metadata is not a map of strings")
    return meta


def with_metadata(tflite: bytes, meta: dict[str, str]) -> bytes:
    """`tflite` with its edgetl metadata replaced by `meta`: unpacked with the schema's object API and
    packed again (what TensorFlow's flatbuffer_utils.write_model does), every other buffer unchanged.

    The first input and output tensors take the names `meta` gives (`input_name`, `output_name`: the
    ONNX model's), so an app looks them up by the same names in every format and precision (the
    converters call them `input`/`Identity`, or `serving_default_input:0`/`PartitionedCall:0` in int8).
    A name another tensor already has is not taken: the file keeps its own, and the stored metadata
    always names the file's real tensors."""
    import flatbuffers

    tfl = schema()
    model = tfl.ModelT.InitFromPackedBuf(bytearray(tflite), 0)
    meta = {**meta, **_rename_io(model.subgraphs[0], meta)}
    model.buffers = list(model.buffers or [])
    keep = [m for m in (model.metadata or []) if (m.name.decode() if isinstance(m.name, bytes) else m.name) != METADATA_NAME]
    buffer = tfl.BufferT()
    buffer.data = np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)
    model.buffers.append(buffer)
    entry = tfl.MetadataT()
    entry.name = METADATA_NAME
    entry.buffer = len(model.buffers) - 1
    model.metadata = [*keep, entry]
    builder = flatbuffers.Builder(len(tflite) + 4096)
    builder.Finish(model.Pack(builder), file_identifier=TFLITE_IDENTIFIER)
    return bytes(builder.Output())


def _rename_io(graph: Any, meta: dict[str, str]) -> dict[str, str]:
    """Name the subgraph's first input and output tensors as `meta` asks where no other tensor has that
    name; the names they have afterwards, as metadata keys."""
    taken = {bytes(t.name or b"") for t in graph.tensors}  # the schema lets a tensor have no name
    names = {}
    for key, index in (("input_name", graph.inputs[0]), ("output_name", graph.outputs[0])):
        tensor, wanted = graph.tensors[index], meta.get(key, "").encode()
        if wanted and wanted not in taken:
            taken.discard(bytes(tensor.name or b""))
            tensor.name = wanted
            taken.add(wanted)
        names[key] = bytes(tensor.name or b"").decode()
    return names


def interpreter_class() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        raise EdgetlError(f"running a .tflite model needs the ai-edge-litert interpreter: {EXTRA_HINT}") from None
    return Interpreter


class LiteRtModel:
    """A .tflite model in the LiteRT interpreter (XNNPACK delegate, `threads` threads).

    Called like the other edgetl runners on float NCHW batches (edgetl's in-process input); the file
    itself takes NHWC, as LiteRT models do, and the batch is transposed on the way in (one strided
    copy into the interpreter's input buffer, which the interpreter would copy anyway)."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        self.path = str(path)
        content = read_tflite(path)  # read once: the metadata and the interpreter take the same bytes
        self.metadata = metadata_of(content, self.path)
        try:
            # "INFO: Created TensorFlow Lite XNNPACK delegate for CPU." from C++, once a process: the delegate is the default.
            with dropping_native_lines("INFO: Created TensorFlow Lite XNNPACK delegate"):
                self.interpreter = interpreter_class()(model_content=content, num_threads=threads or physical_cores())
                self.interpreter.allocate_tensors()
        except EdgetlError:
            raise
        except Exception as exc:
            raise LiteRtLoadError(f"{path} is not a model the LiteRT interpreter can load: {str(exc).splitlines()[0][:160]}") from None
        inp = self.interpreter.get_input_details()[0]
        out = self.interpreter.get_output_details()[0]
        self.input_index, self.output_index = inp["index"], out["index"]
        self.input_name = inp["name"]
        signature = [int(d) for d in inp["shape_signature"]]
        self.nhwc = len(signature) == 4 and signature[-1] in (1, 3)
        self.fixed_batch = signature[0] if signature and signature[0] > 0 else None
        self.input_type = "tensor(float)" if inp["dtype"] == np.float32 else f"tensor({np.dtype(inp['dtype']).name})"
        # The shape as ONNX Runtime reports it (NCHW, batch symbolic) so metadata.validate can check it.
        self.input_shape: list[Any] = ["batch" if d < 0 else d for d in signature]
        self.output_shape: list[Any] = ["batch" if d < 0 else d for d in (int(x) for x in out["shape_signature"])]
        self.precision = "int8" if "quantization" in self.metadata else "fp32"
        self._batch = int(inp["shape"][0])

    def __call__(self, x: np.ndarray) -> np.ndarray:
        n = len(x)
        if n != self._batch:
            self.interpreter.resize_tensor_input(self.input_index, [n, *x.shape[2:], x.shape[1]] if self.nhwc else list(x.shape))
            self.interpreter.allocate_tensors()
            self._batch = n
        feed = x.transpose(0, 2, 3, 1) if self.nhwc else x
        self.interpreter.set_tensor(self.input_index, np.ascontiguousarray(feed, dtype=np.float32))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output_index).copy()

    def predict(self, x: np.ndarray, batch: int = 32) -> np.ndarray:
        from edgetl.runners import run_in_chunks

        return run_in_chunks(self, x, self.fixed_batch, batch)
