"""The Slurm tests' use of the test cluster (`medscale.testing.slurm`): skip without Slurm, or fail in CI.

The tests skip when Slurm is not installed, with a message saying how to run them; with
MEDSCALE_REQUIRE_SLURM=1 (CI) a missing Slurm is a failure.
"""

from __future__ import annotations

import os

import pytest

from medscale.testing.slurm import missing_slurm


def skip_or_fail_without_slurm() -> None:
    why = missing_slurm()
    if why is None:
        return
    how = ("install it with `apt-get install slurm-wlm munge` as root and run `make test` again "
           "(.ci/run does both)")
    if os.environ.get("MEDSCALE_REQUIRE_SLURM") == "1":
        pytest.fail(f"MEDSCALE_REQUIRE_SLURM=1 but {why}: {how}", pytrace=False)
    pytest.skip(f"{why}: {how}; MEDSCALE_REQUIRE_SLURM=1 turns this skip into a failure")
