"""TensorRT op-support pre-check on tiny in-process ONNX graphs.

Run: .venv/bin/pytest tests/unit/test_op_check.py -q
"""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from onnx import TensorProto, helper

from conceptseg_export import op_check

OPSET = [helper.make_opsetid("", 18)]


def _value(name: str, shape=(1, 4)) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def _supported_model() -> onnx.ModelProto:
    nodes = [helper.make_node("Add", ["x", "x"], ["s"]), helper.make_node("Relu", ["s"], ["y"])]
    graph = helper.make_graph(nodes, "ok", [_value("x")], [_value("y")])
    return helper.make_model(graph, opset_imports=OPSET)


def _unsupported_model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Relu", ["x"], ["r"]),
        helper.make_node("Unique", ["r"], ["u"]),  # "N" in the matrix
        helper.make_node("FusedThing", ["r"], ["f"], domain="com.example"),  # custom domain
        helper.make_node("FusedThing", ["f"], ["y"], domain="com.example"),
    ]
    graph = helper.make_graph(nodes, "bad", [_value("x")], [_value("y")])
    opsets = [*OPSET, helper.make_opsetid("com.example", 1)]
    return helper.make_model(graph, opset_imports=opsets)


def _if_model(inner_op: str) -> onnx.ModelProto:
    """``If(cond)`` whose then-branch runs ``inner_op`` and else-branch an Identity."""
    then_graph = helper.make_graph(
        [helper.make_node(inner_op, ["x"], ["t"])], "then", [], [_value("t")]
    )
    else_graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["e"])], "else", [], [_value("e")]
    )
    node = helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph)
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    graph = helper.make_graph([node], "branchy", [cond, _value("x")], [_value("y")])
    return helper.make_model(graph, opset_imports=OPSET)


def test_supported_only_graph_reports_nothing(tmp_path):
    path = _save(_supported_model(), tmp_path / "ok.onnx")
    assert op_check.unsupported_ops(path) == {}


def test_unsupported_and_custom_domain_ops_are_counted(tmp_path):
    path = _save(_unsupported_model(), tmp_path / "bad.onnx")
    assert op_check.unsupported_ops(path) == {"Unique": 1, "com.example::FusedThing": 2}


@pytest.mark.parametrize(("inner", "expected"), [("Unique", {"Unique": 1}), ("Sqrt", {})])
def test_ops_inside_if_subgraph_are_walked(tmp_path, inner, expected):
    path = _save(_if_model(inner), tmp_path / "branchy.onnx")
    assert op_check.unsupported_ops(path) == expected, "If itself is supported; its body decides"


def test_local_function_call_is_inlined_not_counted(tmp_path):
    body = [helper.make_node("Unique", ["a"], ["b"])]
    function = helper.make_function("local", "MyBlock", ["a"], ["b"], body, OPSET)
    call = helper.make_node("MyBlock", ["x"], ["y"], domain="local")
    graph = helper.make_graph([call], "fn", [_value("x")], [_value("y")])
    model = helper.make_model(
        graph, opset_imports=[*OPSET, helper.make_opsetid("local", 1)], functions=[function]
    )
    path = _save(model, tmp_path / "fn.onnx")
    assert op_check.unsupported_ops(path) == {"Unique": 1}


def test_cli_table_and_exit_codes(tmp_path, capsys):
    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    _save(_supported_model(), good / "a.onnx")
    _save(_supported_model(), bad / "a.onnx")
    _save(_unsupported_model(), bad / "b.onnx")

    assert op_check.main([str(good)]) == 0
    assert op_check.main([str(bad)]) == 1
    out = capsys.readouterr().out
    assert "b.onnx" in out and "UNSUPPORTED" in out and "Unique (1)" in out
    assert op_check.main([str(tmp_path / "missing")]) == 2, "a directory without graphs is an error"


def test_supported_ops_table_names_its_source():
    table = op_check.supported_ops()
    source = table["source"]
    assert source["repository"] == "onnx/onnx-tensorrt" and source["file"] == "docs/operators.md"
    assert len(source["commit"]) == 40
    from conceptseg import gpu_stack

    # the table is a newer TensorRT's: then it must say what is unverified for the deployment one
    if table["tensorrt_version"] != gpu_stack.load()["tensorrt"]:
        unverified = set(table["deployment"]["unverified_ops"])
        assert unverified <= set(table["supported_ops"]) and unverified
        assert not unverified & op_check.deployment_supported(table), "unverified counts as unsupported"
    supported = set(table["supported_ops"])
    assert not supported & set(table["not_supported"])
    assert set(table["restrictions"]) <= supported
    legacy = {"ImageScaler", "ParametricSoftplus", "ScaledTanh"}  # pre-opset-9 experimental ops
    known = {s.name for s in onnx.defs.get_all_schemas_with_history() if s.domain == ""}
    assert supported - known <= legacy, f"typo in the table? {sorted(supported - known - legacy)}"


def test_int8_graphs_for_onnx_runtime_are_left_out(tmp_path):
    _save(_supported_model(), tmp_path / "sam3_vision.onnx")
    _save(_unsupported_model(), tmp_path / "sam3_vision.int8.onnx")  # MatMulInteger & co.
    results, _ = op_check.check_dir(tmp_path)
    assert list(results) == ["sam3_vision.onnx"] and op_check.main([str(tmp_path)]) == 0
