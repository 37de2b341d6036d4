"""The GPU check script, run on the CPU on a tiny recipe: every mode measured or reported, and
the bf16 check's parts (fp32 fake quantization under autocast, finite losses, agreement)."""

import math

import pytest

from dfqkit import bench_gpu

TINY = ["LATENT_DIM = 8", "generators.ConditionalGenerator.width = 8"]


@pytest.mark.slow
def test_the_gpu_check_measures_each_mode_and_checks_bf16(teacher_env, monkeypatch, tmp_path):
    def no_compile(run):
        raise RuntimeError("compile is not available here")

    monkeypatch.setattr(bench_gpu, "_compile", no_compile)
    result = bench_gpu.check(
        ["recipes/mnist/gdfq_w4a4.gin"],
        modes=["fp32", "bf16_cl", "bf16_compile"],
        batch=4,
        params=TINY,
        warmup=1,
        iters=2,
        check_iters=2,
    )
    assert [r["mode"] for r in result["rows"]] == ["fp32", "bf16_cl"]
    assert all(math.isfinite(r["img_per_s"]) and r["img_per_s"] > 0 for r in result["rows"])
    assert result["failed"] == [
        {
            "recipe": "recipes/mnist/gdfq_w4a4.gin",
            "mode": "bf16_compile",
            "error": "compile is not available here",
        }
    ]
    check = result["bf16_checks"]["recipes/mnist/gdfq_w4a4.gin"]
    assert check["bf16"]["quantizer_dtypes"] == ["torch.float32"]  # fake quant stays fp32
    assert check["no"]["losses_finite"] and check["bf16"]["losses_finite"]
    assert check["teacher_relative_l2"] < 0.02 and check["ok"]
    text = bench_gpu.table(result)
    assert "| recipes/mnist/gdfq_w4a4.gin | bf16_cl |" in text and "bf16 check" in text


def test_unknown_modes_are_named():
    with pytest.raises(Exception, match="unknown \\['fp8'\\]"):
        bench_gpu.check(["recipes/mnist/gdfq_w4a4.gin"], modes=["fp8"])
