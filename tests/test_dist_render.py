"""`render --manifest` under torchrun: 2 gloo ranks on the CPU share a batch, each job once; a rerun
with 3 ranks finds everything finished."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from livetalk_cli.dist_render import Ranks, deal, share
from tests.test_render import FACE, ROOT, write_wav


def test_each_job_goes_to_exactly_one_rank():
    items = list(range(11))
    for world in (1, 2, 3, 5):
        dealt = [share(items, Ranks(r, world)) for r in range(world)]
        assert sorted(i for d in dealt for i in d) == items
        assert max(map(len, dealt)) - min(map(len, dealt)) <= 1


def test_finished_jobs_are_reported_by_rank_zero_only():
    planned = [("a", True), ("b", False), ("c", True), ("d", False), ("e", False)]

    def dealt(rank: int, world: int) -> list[str]:
        return [p[0] for p in deal(planned, Ranks(rank, world), skip=lambda p: p[1])]

    assert dealt(0, 2) == ["a", "c", "b", "e"] and dealt(1, 2) == ["d"]
    assert dealt(0, 1) == ["a", "b", "c", "d", "e"]


def torchrun(ranks: int, manifest, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "livetalk_cli", "render", "--manifest", str(manifest), "--image", str(FACE),
           "--preset", "tiny", "--random-weights", "--device", "cpu", "--threads", "1"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)


def test_two_gloo_ranks_share_a_batch_and_a_rerun_skips_it(tmp_path):
    lines = []
    for i in range(4):
        write_wav(tmp_path / f"a{i}.wav", 0.6 + 0.1 * i, seed=i)
        lines.append(json.dumps({"audio": f"a{i}.wav", "out": f"out/v{i}.mp4"}))
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    res = torchrun(2, manifest, tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "2 ranks: 4 rendered, 0 skipped, 0 failed (rendered per rank: 2, 2)" in res.stderr, res.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [f"v{i}.mp4" for i in range(4)]
    assert res.stderr.count("wrote ") == 4  # every result reported once, by rank 0
    again = torchrun(3, manifest, tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "3 ranks: 0 rendered, 4 skipped, 0 failed" in again.stderr
