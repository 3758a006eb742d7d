"""Fixtures the distill tests share. They run single-threaded (`one_thread`, and `tiny_run` builds
its run folder on one thread): on a small, busy machine oversubscribed BLAS threads make the tiny
stages ~10x slower, and one thread is deterministic."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from livetalk_cli.cli import app
from livetalk_cli.runtime.threads import intra_op_threads
from tests.distill_helpers import TINY


@pytest.fixture(scope="module")
def one_thread():
    with intra_op_threads(1):
        yield


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, Path]:
    """`livetalk distill TINY --out RUN` (every stage); (recipe, run folder)."""
    root = tmp_path_factory.mktemp("distill")
    recipe = root / "recipe.yaml"
    recipe.write_text(TINY)
    out = root / "run"
    with intra_op_threads(1):
        res = CliRunner().invoke(app, ["distill", str(recipe), "--out", str(out)])
    assert res.exit_code == 0, (res.output, res.exception)
    return recipe, out
