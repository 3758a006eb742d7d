"""The command line's own surface: --version, presets, help text, warnings."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from livetalk_cli.cli import app
from livetalk_cli.config import PRESETS, preset

runner = CliRunner()


def test_version():
    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and re.fullmatch(r"livetalk \d+\.\d+\.\d+\n", res.output), res.output


def test_presets_lists_every_preset_with_its_settings():
    res = runner.invoke(app, ["presets"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    for name in PRESETS:
        cfg = preset(name)
        (line,) = [x for x in lines if x.startswith(name + " ")]
        assert f"{cfg.width}x{cfg.height}" in line and f"{cfg.dit.num_layers}x{cfg.dit.dim}" in line
        assert f"{cfg.stream.sink_frames}+{cfg.stream.window_frames} " in line
    assert "14.3B" in next(x for x in lines if x.startswith("omniavatar-14b"))  # counted, not typed in
    assert max(map(len, lines)) <= 80


def test_help_has_no_type_tags_and_lists_choices():
    for command in ("render", "bench", "distill", "eval"):
        res = runner.invoke(app, [command, "--help"], env={"COLUMNS": "100"})
        assert res.exit_code == 0, res.output
        assert "<bool>" not in res.output, command
    res = runner.invoke(app, ["render", "--help"], env={"COLUMNS": "200"})
    assert "tiny|demo|wan2.1-t2v-1.3b|omniavatar-1.3b|omniavatar-14b" in res.output


def test_half_precision_on_cpu_warns_that_it_is_slow(tmp_path):
    res = runner.invoke(app, ["render", str(tmp_path / "nope.wav"), "--image", "x.png", "--out",
                              str(tmp_path / "o.mp4"), "--device", "cpu", "--dtype", "float16"])
    assert res.exit_code == 2  # the missing audio
    assert "--dtype float16 on CPU" in res.output and "slower than float32" in res.output
