import json

import pytest

pytest.importorskip("onnxruntime")

from dfqkit import bench_onnx  # noqa: E402


def test_bench_onnx_reports_size_and_latency_of_the_float_and_qdq_files(capsys, tmp_path):
    out = tmp_path / "rows.json"
    assert (
        bench_onnx.main(
            ["--model", "mnist_resnet8", "--runs", "1", "--batch", "1", "--json", str(out)]
        )
        == 0
    )
    rows = {row["file"]: row for row in json.loads(out.read_text())}
    assert set(rows) == {"float", "W4A4 QDQ, default session", "W4A4 QDQ, disable_quant_qdq"}
    assert rows["W4A4 QDQ, default session"]["size_kb"] < 0.4 * rows["float"]["size_kb"]
    assert all(row["batch1_ms"] > 0 for row in rows.values())
    assert "| mnist_resnet8 | float |" in capsys.readouterr().out
