#!/usr/bin/env python3
"""Small ONNX graphs for the ONNX Runtime backend's tests (models/tests/onnx_*.rs).

usage: onnx_models.py OUT_DIR
Writes one folder per model, each holding model.onnx:
  add_mul/         A, B: FP32 [batch, 4] -> SUM = A + B, PRODUCT = A * B
  int64_double/    X: INT64 [batch, 3] -> DOUBLED = X + X (INT64), AS_FP16 = Cast(X) (FP16)
  identity_types/  one Identity per element type the backend moves (FP32, FP64, FP16, BF16, INT64,
                   INT32, INT16, INT8, UINT8, UINT16, UINT32, UINT64, BOOL): IN_<T> [batch, 2] -> OUT_<T>
  fixed_shape/     X: FP32 [2, 3] -> SQUARE = X * X (no dynamic dimension: not batchable)
  string_input/    S: STRING [batch] -> T = Identity(S)
Stand-ins for the models of Triton's example repository (tests/e2e/test_triton_examples.py):
  simple/          INPUT0, INPUT1: INT32 [batch, 16] -> OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1
  simple_string/   the same on STRING tensors holding decimal numbers: Cast to INT32, Add / Sub,
                   Cast back to STRING
  simple_identity/ INPUT0: STRING [batch, n] -> OUTPUT0 = Identity(INPUT0)
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


def add_sub(name: str, elem: int) -> onnx.GraphProto:
    """OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1 on [batch, 16]; for STRING tensors the
    arithmetic is done on INT32 (Cast in, Cast out)."""
    ins = [tensor(f"INPUT{i}", elem, ["batch", 16]) for i in (0, 1)]
    outs = [tensor(f"OUTPUT{i}", elem, ["batch", 16]) for i in (0, 1)]
    if elem == TensorProto.INT32:
        nodes = [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ]
    else:
        nodes = [
            helper.make_node("Cast", ["INPUT0"], ["A"], to=TensorProto.INT32),
            helper.make_node("Cast", ["INPUT1"], ["B"], to=TensorProto.INT32),
            helper.make_node("Add", ["A", "B"], ["SUM"]),
            helper.make_node("Sub", ["A", "B"], ["DIFF"]),
            helper.make_node("Cast", ["SUM"], ["OUTPUT0"], to=elem),
            helper.make_node("Cast", ["DIFF"], ["OUTPUT1"], to=elem),
        ]
    return helper.make_graph(nodes, name, ins, outs)


def simple() -> onnx.GraphProto:
    return add_sub("simple", TensorProto.INT32)


def simple_string() -> onnx.GraphProto:
    return add_sub("simple_string", TensorProto.STRING)


def simple_identity() -> onnx.GraphProto:
    return helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])],
        "simple_identity",
        [tensor("INPUT0", TensorProto.STRING, ["batch", "n"])],
        [tensor("OUTPUT0", TensorProto.STRING, ["batch", "n"])],
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
        ("simple", simple),
        ("simple_string", simple_string),
        ("simple_identity", simple_identity),
    ]:
        save(out, name, build())
    return 0


if __name__ == "__main__":
    sys.exit(main())
