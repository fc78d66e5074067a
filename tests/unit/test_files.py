"""atomic_write: whole files only, also when several processes write the same file at once."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

from medscale.files import atomic_write


def _writer(path: str, text: str, n: int) -> None:
    for _ in range(n):
        atomic_write(path, text)


def test_concurrent_writers_of_one_file_all_succeed(tmp_path):
    # The tasks of a Slurm prep array start together and each writes plan.json: with one shared
    # temporary name, one task's rename took the file from under another (FileNotFoundError).
    path = tmp_path / "plan.json"
    texts = [str(i) * 5000 for i in range(4)]
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_writer, args=(str(path), t, 300)) for t in texts]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    assert path.read_text() in texts
    assert list(tmp_path.iterdir()) == [path], "a temporary file was left behind"


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    atomic_write(path, "old")
    try:
        atomic_write(path, object())  # type: ignore[arg-type]
    except TypeError:
        pass
    assert path.read_text() == "old" and sorted(Path(tmp_path).iterdir()) == [path]
