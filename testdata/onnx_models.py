#!/usr/bin/env python3
"""Small ONNX graphs for the ONNX Runtime backend's tests (models/tests/onnx_*.rs).

usage: onnx_models.py OUT_DIR
Writes one folder per model, each holding model.onnx:
  add_mul/         A, B: FP32 [batch, 4] -> SUM = A + B, PRODUCT = A * B
  int64_double/    X: INT64 [batch, 3] -> DOUBLED = X + X (INT64), AS_FP16 = Cast(X) (FP16)
  identity_types/  one Identity per element type the backend moves (FP32, FP64, FP16, BF16, INT64,
                   INT32, INT16, INT8, UINT8, UINT16, UINT32, UINT64, BOOL): IN_<T> [batch, 2] -> OUT_<T>
  fixed_shape/     X: FP32 [2, 3] -> SQUARE = X * X (no dynamic dimension: not batchable)
  string_input/    S: STRING [batch] -> T = Identity(S) (the backend refuses string tensors)
Needs: onnx. Deterministic: the same bytes on every run.
"""
import pathlib
import sys

import onnx
from onnx import TensorProto, helper

OPSET = 17
IR_VERSION = 8  # readable by any ONNX Runtime >= 1.10


def save(out: pathlib.Path, name: str, graph: onnx.GraphProto) -> None:
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="veraltheim-testdata",
    )
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(folder / "model.onnx"))


def tensor(name: str, elem: int, dims) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, dims)


def add_mul() -> onnx.GraphProto:
    return helper.make_graph(
        [
            helper.make_node("Add", ["A", "B"], ["SUM"]),
            helper.make_node("Mul", ["A", "B"], ["PRODUCT"]),
        ],
        "add_mul",
        [tensor("A", TensorProto.FLOAT, ["batch", 4]), tensor("B", TensorProto.FLOAT, ["batch", 4])],
        [tensor("SUM", TensorProto.FLOAT, ["batch", 4]), tensor("PRODUCT", TensorProto.FLOAT, ["batch", 4])],
    )


def int64_double() -> onnx.GraphProto:
    return helper.make_graph(
        [
            helper.make_node("Add", ["X", "X"], ["DOUBLED"]),
            helper.make_node("Cast", ["X"], ["AS_FP16"], to=TensorProto.FLOAT16),
        ],
        "int64_double",
        [tensor("X", TensorProto.INT64, ["batch", 3])],
        [tensor("DOUBLED", TensorProto.INT64, ["batch", 3]), tensor("AS_FP16", TensorProto.FLOAT16, ["batch", 3])],
    )


TYPES = [
    ("FP32", TensorProto.FLOAT),
    ("FP64", TensorProto.DOUBLE),
    ("FP16", TensorProto.FLOAT16),
    ("BF16", TensorProto.BFLOAT16),
    ("INT64", TensorProto.INT64),
    ("INT32", TensorProto.INT32),
    ("INT16", TensorProto.INT16),
    ("INT8", TensorProto.INT8),
    ("UINT8", TensorProto.UINT8),
    ("UINT16", TensorProto.UINT16),
    ("UINT32", TensorProto.UINT32),
    ("UINT64", TensorProto.UINT64),
    ("BOOL", TensorProto.BOOL),
]


def identity_types() -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Identity", [f"IN_{t}"], [f"OUT_{t}"]) for t, _ in TYPES],
        "identity_types",
        [tensor(f"IN_{t}", e, ["batch", 2]) for t, e in TYPES],
        [tensor(f"OUT_{t}", e, ["batch", 2]) for t, e in TYPES],
    )


def fixed_shape() -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Mul", ["X", "X"], ["SQUARE"])],
        "fixed_shape",
        [tensor("X", TensorProto.FLOAT, [2, 3])],
        [tensor("SQUARE", TensorProto.FLOAT, [2, 3])],
    )


def string_input() -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Identity", ["S"], ["T"])],
        "string_input",
        [tensor("S", TensorProto.STRING, ["batch"])],
        [tensor("T", TensorProto.STRING, ["batch"])],
    )


def main() -> int:
    if len(sys.argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    out = pathlib.Path(sys.argv[1])
    for name, build in [
        ("add_mul", add_mul),
        ("int64_double", int64_double),
        ("identity_types", identity_types),
        ("fixed_shape", fixed_shape),
        ("string_input", string_input),
    ]:
        save(out, name, build())
    return 0


if __name__ == "__main__":
    sys.exit(main())
