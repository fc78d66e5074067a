"""A prep worker that dies (a C decoder aborting on a corrupt stream, the OOM killer) ends the run
with a clear error instead of hanging it, and a rerun with --resume finishes the job."""

from __future__ import annotations

import os
import signal

import pytest
from PIL import Image
from test_prep import prep

from medscale.prep import chunks
from medscale.prep.job import PrepIncomplete


def test_a_dead_worker_fails_the_run_clearly_and_resume_finishes_it(tmp_path, monkeypatch):
    src = tmp_path / "in"
    src.mkdir()
    for i in range(6):
        Image.new("RGB", (16, 12), (i * 40, 10, 10)).save(src / f"p{i}.png")
    real = chunks.photo_samples

    def dies_on_p3(ctx, s):  # forked workers inherit this patch
        if s.path.endswith("p3.png"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real(ctx, s)

    monkeypatch.setattr(chunks, "photo_samples", dies_on_p3)
    out = tmp_path / "out"
    with pytest.raises(PrepIncomplete, match="worker process died.*--resume"):
        prep([src], out, workers=2, chunk_files=1)
    monkeypatch.setattr(chunks, "photo_samples", real)
    manifest = prep([src], out, workers=2, chunk_files=1, resume=True, overwrite=False)
    assert manifest["samples"] == 6 and manifest["rejected"] == 0
