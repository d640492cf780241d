"""ONNX Runtime sessions, configured in one place for every stage: export validation, ``pladis build
--backend ort`` (which saves the optimised graph) and the runtime's ``ort`` backend.

``providers(device)``: CPU, or CUDA (TensorRT's execution provider first when present). ``session_options``:
graph optimisation level, quiet logging, intra-op threads (0: one per physical core), and optionally the file
the optimised graph is saved to (weights beside it, past protobuf's 2 GB limit).
"""

from __future__ import annotations

from pathlib import Path

from pladis.manifest import EngineError

OPT_LEVELS = {0: "ORT_DISABLE_ALL", 1: "ORT_ENABLE_BASIC", 2: "ORT_ENABLE_EXTENDED", 3: "ORT_ENABLE_ALL"}


def providers(device: str, cuda_graph: bool = False) -> list:
    """Execution providers for ``device``: CPU, or CUDA (TensorRT first when that provider is present).
    cuda_graph: the CUDA provider alone, with ONNX Runtime's CUDA graphs on (``enable_cuda_graph``; every node
    must then run on it, else creating the session fails)."""
    import onnxruntime as ort

    if device == "cpu":
        return ["CPUExecutionProvider"]
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise EngineError(
            f"device {device!r} needs onnxruntime-gpu (providers here: {', '.join(available)}); install the `gpu` "
            "extra instead of `cpu` (never both), or run on device cpu"
        )
    if cuda_graph:
        return [("CUDAExecutionProvider", {"enable_cuda_graph": "1"}), "CPUExecutionProvider"]
    wanted = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    return [p for p in wanted if p in available]


def session_options(level: int = 3, threads: int = 0, optimized_path: Path | None = None):
    """``onnxruntime.SessionOptions``: optimisation ``level`` 0-3 (clamped), ``threads`` intra-op threads (0:
    ONNX Runtime's default), and with ``optimized_path`` the optimised graph saved there."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, OPT_LEVELS[min(max(level, 0), 3)])
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    if optimized_path is not None:
        opts.optimized_model_filepath = str(optimized_path)
        # weights of large models go to one file beside the optimised graph (protobuf's 2 GB limit)
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                      f"{optimized_path.name}.data")  # fmt: skip
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1048576")
    return opts


def session(path: str | Path, device: str = "cpu", level: int = 3, threads: int = 0,
            optimized_path: Path | None = None, initializers: dict | None = None,
            cuda_graph: bool = False):  # fmt: skip
    """An ``onnxruntime.InferenceSession`` on ``path`` for ``device`` with ``session_options`` (cuda_graph: see
    ``providers``). ``initializers``: {name: numpy array} that replace those initializers of the file in this
    session (``SessionOptions.add_initializer``; ONNX Runtime uses the arrays' memory, kept alive by the session)."""
    import onnxruntime as ort

    opts = session_options(level, threads, optimized_path)
    values = []
    for name, array in (initializers or {}).items():
        values.append(ort.OrtValue.ortvalue_from_numpy(array))
        opts.add_initializer(name, values[-1])
    try:
        sess = ort.InferenceSession(str(path), opts, providers=providers(device, cuda_graph))
        sess._pladis_initializers = (values, initializers)  # ONNX Runtime reads them for the session's life
        return sess
    except Exception as err:
        if not any(m in str(err) for m in _DAMAGED):  # not a damaged file: a bug, keep the traceback
            raise
        first = str(err).strip().splitlines()[0][:200]
        raise EngineError(f"{path} cannot be read by ONNX Runtime ({first}): the file is damaged or truncated; "
                          "re-export or rebuild it (without --no-verify, pladis checks every file's sha256 "
                          "first)") from None  # fmt: skip


# ONNX Runtime's messages for a file that is not a whole ONNX model (truncated graph or external data).
_DAMAGED = ("INVALID_PROTOBUF", "Protobuf parsing failed", "External initializer", "external data",
            "out of bounds", "GetExtDataFromTensorProto")  # fmt: skip
