import json

import pytest

from dfqkit import bench


def _fake_run(out, recipe_stem, seed, best, naive=20.0, teacher=98.0, calibrated=None):
    d = out / "runs" / f"mnist_{recipe_stem}" / f"seed{seed}"
    d.mkdir(parents=True)
    metrics = {
        "recipe": f"recipes/mnist/{recipe_stem}.gin",
        "seed": seed,
        "w_bits": 2,
        "a_bits": 4,
        "teacher": {"test_top1": teacher},
        "calibrated": None if calibrated is None else {"epoch": 2, "test_top1": calibrated},
        "naive": {"test_top1": naive},
        "best": {"epoch": 3, "val_top1": best, "test_top1": best},
        "last": {"test_top1": best - 1},
        "last5": {"test_top1": best - 2},
        "ms_per_iter": 10.0,
    }
    (d / "metrics.json").write_text(json.dumps(metrics))


def test_accuracy_aggregates_existing_runs_into_table_json_and_plot(tmp_path):
    for seed, best in ((0, 80.0), (1, 84.0)):
        _fake_run(tmp_path, "gdfq_w2a4", seed, best)
    rows = bench.accuracy(["recipes/mnist/gdfq_w2a4.gin"], [0, 1], tmp_path)
    row = rows[0]
    assert row["best"]["mean"] == pytest.approx(82.0)
    assert row["best"]["std"] == pytest.approx(2.8284271, rel=1e-6)  # sample std of 80, 84
    assert row["last5"]["mean"] == pytest.approx(80.0)
    table = (tmp_path / "results.md").read_text()
    # no calibrated student in these runs: "–"
    row = "| recipes/mnist/gdfq_w2a4.gin | W2A4 | 98.00 | 20.00 ± 0.00 | – | 82.00 ± 2.83 |"
    assert row in table
    assert "WARNING" not in table
    assert json.loads((tmp_path / "results.json").read_text())[0]["seeds"] == [0, 1]
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


def test_accuracy_reports_the_calibrated_student_and_warns_when_teachers_differ(tmp_path, capsys):
    _fake_run(tmp_path, "gdfq_w2a4", 0, 80.0, calibrated=30.0)
    _fake_run(tmp_path, "gdfq_w2a4", 1, 84.0, calibrated=40.0, teacher=98.6)
    rows = bench.accuracy(["recipes/mnist/gdfq_w2a4.gin"], [0, 1], tmp_path)
    assert rows[0]["calibrated"]["mean"] == pytest.approx(35.0)
    table = (tmp_path / "results.md").read_text()
    assert "| 35.00 ± 7.07 | 82.00 ± 2.83 |" in table
    warning = "used different teachers (test top-1 98.00, 98.60); their figures are not comparable"
    assert warning in table and warning in capsys.readouterr().err


@pytest.mark.parametrize("layout", [[], ["--channels_last"]], ids=["nchw", "channels_last"])
def test_speed_reports_step_times_on_random_weights(tmp_path, layout):
    out = tmp_path / "speed.json"
    code = bench.main(
        [
            "speed",
            *layout,
            "--gin",
            "recipes/mnist/gdfq_w4a4.gin",
            "--batch",
            "4",
            "--iters",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
            "--gin_param",
            "generators.ConditionalGenerator.width = 8",
        ]
    )
    assert code == 0
    res = json.loads(out.read_text())
    for key in ("ms_per_iter", "img_per_s", "peak_rss_mb", "ms_generator_step", "ms_student_step"):
        assert res[key] > 0
    assert res["cpu_ms_per_iter"] > 0
    assert res["channels_last"] is bool(layout) and res["compile"] is False
    assert res["batch_size"] == 4
    assert res["ms_per_iter"] == pytest.approx(
        res["ms_generator_step"] + res["ms_student_step"], rel=0.05
    )
    assert res["img_per_s"] == pytest.approx(1000 * 4 / res["ms_per_iter"])
    # the calibration iterations (no student step) are timed apart, with the peak when they end
    assert res["ms_calibration_iter"] > 0
    assert 0 < res["peak_rss_calibration_mb"] <= res["peak_rss_mb"]
    assert "official" not in res  # nothing official was measured for this recipe and batch


@pytest.mark.slow
def test_calibration_compares_range_sources(teacher_env, tmp_path, capsys):
    from dfqkit.bench import main as bench_main

    out = tmp_path / "cal.json"
    code = bench_main(
        [
            "calibration",
            "--gin",
            "recipes/mnist/gdfq_w4a3.gin",
            "--batches",
            "3",
            "--scales",
            "1.0",
            "0.5",
            "--json",
            str(out),
            "--gin_param",
            "BATCH_SIZE = 8",
        ]
    )
    assert code == 0
    res = json.loads(out.read_text())
    assert set(res["sources"]) == {"noise", "real"} and res["batches"] == 3
    for row in res["sources"].values():
        assert len(row["hi"]) == 7 and all(h > 0 for h in row["hi"])
        assert row["scaled"]["1.0"] == row["top1"]  # scaling by 1 is the unscaled range
    # the two sources observe different ranges
    assert res["sources"]["noise"]["hi"] != res["sources"]["real"]["hi"]


def test_speed_compares_with_official_figures_only_where_they_were_measured():
    from dfqkit.bench_official import OFFICIAL, compare

    recipe = "recipes/gdfq/resnet20_cifar100_w4a4.gin"
    res = {
        "recipe": recipe,
        "implementation": "dfqkit",
        "batch_size": 64,
        "threads": 1,
        "device": "cpu",
        "ms_per_iter": 338.0,
    }
    out = compare(res)
    assert out["official"]["ms_per_iter"] == OFFICIAL[(recipe, 64, 1, "cpu")]["ms_per_iter"]
    assert out["speedup_vs_official"] == pytest.approx(out["official"]["ms_per_iter"] / 338.0)
    assert compare({**res, "threads": 2}) is None  # not measured: no ratio at all
    assert compare({**res, "batch_size": 32}) is None
    assert compare({**res, "implementation": "reference:gdfq"}) is None


def test_reference_activation_ranges_follow_the_official_bias_corrected_ema():
    import torch

    from dfqkit.bench_reference import _QuantAct

    act = _QuantAct(4)
    act.running = True
    act(torch.tensor([-1.0, 0.5, 3.0]))
    assert act.lo.item() == pytest.approx(-1.0, rel=1e-5)
    assert act.hi.item() == pytest.approx(3.0, rel=1e-5)
    act(torch.tensor([-2.0, 5.0]))
    # beta_t = 0.81: (-1·0.9 − 2·0.1) / 0.19 and (3·0.9 + 5·0.1) / 0.19
    assert act.lo.item() == pytest.approx(-1.1 / 0.19, rel=1e-5)
    assert act.hi.item() == pytest.approx(3.2 / 0.19, rel=1e-5)
    act.running = False
    act(torch.tensor([-100.0, 100.0]))  # frozen: ranges unchanged
    assert act.hi.item() == pytest.approx(3.2 / 0.19, rel=1e-5)


def test_reference_iteration_times_calibration_and_training_phases():
    import torch
    from torch import nn

    from dfqkit.bench_reference import reference_iteration

    torch.manual_seed(0)
    teacher = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    shape = dict(num_classes=3, image_size=8, channels=1, batch_size=4, w_bits=4, a_bits=4)
    res = reference_iteration(teacher, **shape, iters=2, warmup=2)
    assert set(res) == {
        "ms_per_iter",
        "cpu_ms_per_iter",
        "ms_calibration_iter",
        "peak_rss_calibration_mb",
    }
    assert all(v > 0 for v in res.values())
    with pytest.raises(ValueError, match="warmup"):
        reference_iteration(teacher, **shape, iters=1, warmup=0)
