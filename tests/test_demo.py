from lo_ops.__main__ import main


def test_demo_trains(capsys, tmp_path):
    assert main(["demo", "--steps", "60", "--plot", str(tmp_path / "curves.png")]) == 0
    out = capsys.readouterr().out
    assert "SmallFCLOpt" in out and "AdamW 1e-3" in out and "test acc" in out
    assert "meta-trained by lo_ops" in out and "outer PES steps" in out
    assert "Celo" in out and "Celo-Adam" in out
    assert "Best offline learned optimizer here" in out
    if (tmp_path / "curves.png").exists() is False:
        import importlib.util

        assert importlib.util.find_spec("matplotlib") is None  # no PNG only without matplotlib
    assert "threads" in out.splitlines()[0]  # the figures say what they were taken with
    assert " 0.0000" not in out and "loss 0.0000" not in out  # three significant digits, not four decimals


def test_smoothed_curve_is_a_centred_log_moving_average():
    from lo_ops.demo import smoothed

    import pytest

    assert smoothed([1.0, 100.0, 1.0], window=3) == pytest.approx([10.0, 10.0 ** (2 / 3), 10.0])
    assert smoothed([2.0] * 7, window=5) == pytest.approx([2.0] * 7)
    assert len(smoothed(list(range(1, 61)))) == 60
