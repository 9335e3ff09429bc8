"""ONNX Runtime's own int8 for a checkpoint: the fp32 ONNX export quantised with quantize_dynamic.

    quantize_dynamic(model.onnx, model.int8.onnx, per_channel=True, weight_type=QuantType.QInt8)

(ORT's dynamic quantisation: MatMul weights int8 per output channel, activations uint8 per tensor at run
time.)  Shared by benchmarks/bench_e2e.py and tests/test_precision.py; the quantised file is cached next
to the exported one.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


def export_int8(fp32_onnx: str | Path) -> dict:
    """Quantise an fp32 ONNX model once; returns {"path", "quantize_s"|"cached", options}."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src = Path(fp32_onnx)
    path = src.with_name(src.stem + ".int8.onnx")
    info_path = path.with_suffix(".json")
    options = {"quantizer": "onnxruntime.quantization.quantize_dynamic", "per_channel": True,
               "weight_type": "QInt8", "activations": "QUInt8 per tensor, dynamic"}
    if path.is_file() and info_path.is_file():
        return {**json.loads(info_path.read_text()), "path": str(path), "cached": True}
    t0 = time.perf_counter()
    quantize_dynamic(str(src), str(path), per_channel=True, weight_type=QuantType.QInt8)
    info = {**options, "quantize_s": time.perf_counter() - t0}
    info_path.write_text(json.dumps(info, indent=2))
    return {**info, "path": str(path), "cached": False}


def session(path: str | Path, threads: int):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
