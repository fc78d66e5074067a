"""Progress on a terminal and in a log file, through the real CLI: tqdm bars only where a person
watches (a pseudo-terminal), plain periodic lines and no carriage returns in a file (a Slurm log)."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from conftest import subprocess_env, tiny_run, write_shards

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


def _config(tmp_path: Path, name: str, shards: Path) -> list[str]:
    tiny_run(tmp_path / f"{name}.yaml", shards, data={"shuffle_block": 8}, model={"name": "test_vit3"},
             train={"steps": 30, "log_every": 10}, dist={"deepspeed_config": "cpu_zero1.json"},
             out_dir=str(tmp_path / name))
    return [sys.executable, "-m", "medscale.cli", "train", "--config", str(tmp_path / f"{name}.yaml")]


def _on_a_terminal(cmd: list[str]) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))  # a terminal window's size
    proc = subprocess.Popen(cmd, cwd=ROOT, env=subprocess_env(), stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    return proc.wait(timeout=300), b"".join(chunks).decode(errors="replace")


def test_bars_on_a_terminal_plain_lines_in_a_file(tmp_path):
    shards = tmp_path / "shards"
    write_shards(shards, {"train": [12, 12], "val": [4], "test": [8]}, size=16)
    code, tty = _on_a_terminal(_config(tmp_path, "tty", shards))
    assert code == 0, tty[-3000:]
    assert "\r" in tty.replace("\r\n", "\n"), "no bar redrawn on the terminal"
    assert "train:" in tty and "30/30 [" in tty and "samples/s" in tty  # tqdm: "train: 100%|...| 30/30 [00:01<..."
    assert "eval test:" in tty and ("batch/s" in tty or "s/batch" in tty)  # the evaluation's bar

    log = tmp_path / "job.log"
    with open(log, "w") as f:
        code = subprocess.run(_config(tmp_path, "file", shards), cwd=ROOT, env=subprocess_env(), stdout=f,
                              stderr=subprocess.STDOUT, timeout=300).returncode
    text = log.read_text()
    assert code == 0, text[-3000:]
    assert "\r" not in text, "carriage returns in a log file"
    assert all(f"step {s}/30" in text for s in (10, 20, 30))
    assert "[rank0]" in text
    assert "/30 [" not in text and "step/s" not in text  # no bar
