from lo_ops.__main__ import main


def test_demo_trains(capsys):
    assert main(["demo", "--steps", "60", "--every", "20"]) == 0
    out = capsys.readouterr().out
    assert "SmallFCLOpt" in out and "full-data loss" in out
