import json
import math

import pytest
import torch

from dfqkit.diagnose import excess_kurtosis, main, mean_pairwise_cosine


def test_excess_kurtosis_by_hand():
    # two-point ±1 distribution: fourth moment 1, variance 1 → kurtosis 1 - 3 = -2
    assert excess_kurtosis(torch.tensor([1.0, -1.0] * 50)) == pytest.approx(-2.0)
    # one spike among zeros: n = 100, x = (1, 0, ..., 0); μ = 0.01
    x = torch.zeros(100)
    x[0] = 1.0
    mu = 0.01
    m2 = (0.99**2 + 99 * mu**2) / 100
    m4 = (0.99**4 + 99 * mu**4) / 100
    assert excess_kurtosis(x) == pytest.approx(m4 / m2**2 - 3)
    torch.manual_seed(0)
    assert abs(excess_kurtosis(torch.randn(400_000))) < 0.05  # Gaussian: 0


def test_mean_pairwise_cosine_by_hand():
    assert mean_pairwise_cosine(torch.eye(3)) == pytest.approx(0.0)
    assert mean_pairwise_cosine(torch.ones(4, 2)) == pytest.approx(1.0)
    f = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]])
    c = 1 / math.sqrt(2)
    assert mean_pairwise_cosine(f) == pytest.approx((c + 0 + c) / 3)


def test_diagnose_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["--run", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "has no config.gin: not a dfqkit run" in err and "Traceback" not in err


@pytest.mark.slow
def test_diagnose_a_finished_run(teacher_env, tmp_path, capsys):
    from dfqkit.train import run

    out = tmp_path / "run"
    params = [
        "EPOCHS = 1",
        "ITERS_PER_EPOCH = 1",
        "BATCH_SIZE = 8",
        "train.warmup_epochs = 0",
        "train.calib_epochs = 1",
        "train.naive_batches = 1",
        "LATENT_DIM = 8",
    ]
    run(["recipes/mnist/gdfq_w4a4.gin"], params, output_dir=out)
    report = tmp_path / "d.json"
    png = tmp_path / "d.png"
    assert (
        main(
            [
                "--run",
                str(out),
                "--batches",
                "2",
                "--batch",
                "8",
                "--json",
                str(report),
                "--out",
                str(png),
            ]
        )
        == 0
    )
    (res,) = json.loads(report.read_text())
    assert res["epochs_done"] == 1
    for kind in ("synthetic", "real"):
        assert len(res[kind]["kurtosis"]) == 7  # the ResNet-8's seven ReLU sites
        assert -1.0 <= res[kind]["pairwise_cosine"] <= 1.0
    assert png.stat().st_size > 0
