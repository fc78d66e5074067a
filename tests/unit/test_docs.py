"""The documentation: a README a newcomer reads in minutes, and docs/ built as a site with MkDocs in
strict mode, so a broken link or a page left out of the navigation fails here."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _build(root: Path, site: Path) -> subprocess.CompletedProcess:
    # No -q: mkdocs counts the warnings that --strict turns into failures only when it logs them.
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(root / "mkdocs.yml"),
                           "-d", str(site)], capture_output=True, text=True, timeout=120)


def test_the_docs_build_strictly(tmp_path):
    r = _build(ROOT, tmp_path / "site")
    assert r.returncode == 0, r.stderr[-3000:]
    for page in ("configuration", "training", "slurm", "prep", "pretraining", "export", "architecture",
                 "extending", "benchmarks"):
        assert (tmp_path / "site" / page / "index.html").is_file(), page


def test_a_broken_link_fails_the_build(tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(ROOT / "mkdocs.yml", copy)
    shutil.copytree(ROOT / "docs", copy / "docs", symlinks=False)
    with open(copy / "docs" / "export.md", "a") as f:
        f.write("\nSee [the missing page](nowhere.md).\n")
    r = _build(copy, tmp_path / "site")
    assert r.returncode != 0 and "nowhere.md" in r.stderr, r.stderr[-2000:]


def test_the_readme_is_short_and_links_every_page():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200
    assert "make demo" in readme and "make test" in readme
    for page in (ROOT / "docs").glob("*.md"):
        if page.name not in ("index.md", "benchmark-figures.md"):
            assert f"](docs/{page.name})" in readme, page.name
