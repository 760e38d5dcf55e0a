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
