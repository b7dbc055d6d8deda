"""`python -m bench --modes linear` runs end to end on tiny shapes and reports every row."""

from __future__ import annotations

import json

from bench.__main__ import main


def test_linear_mode_quick(tmp_path, capsys):
    rc = main(["--device", "cpu", "--modes", "linear", "--quick", "--shapes", "70x12x300",
               "--impls", "xent_ext,naive,torch (chunked),liger", "--reps", "1",
               "--out", str(tmp_path)])
    assert rc == 0
    (path,) = tmp_path.glob("bench-linear-cpu-*.json")
    cells = {c["impl"]: c for c in json.loads(path.read_text())["cells"]}
    assert cells["xent_ext"]["status"] == "ok" and cells["naive"]["status"] == "ok"
    assert cells["xent_ext"]["median_ms"] > 0 and cells["xent_ext"]["extra_bytes"] is not None
    assert cells["liger"]["status"] == "skipped"
    assert "extra/naive" in capsys.readouterr().out


def test_linear_mode_rejects_bad_shape(capsys):
    try:
        main(["--device", "cpu", "--modes", "linear", "--shapes", "70x300"])
    except SystemExit as e:
        assert e.code == 2
    assert "NxHxV" in capsys.readouterr().err
