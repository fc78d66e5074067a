"""Scaffolding the tests and the benchmarks share, that no run uses: the Slurm test cluster (`slurm`).

Synthetic data (DICOM files, tiny shards) is `medscale.synthetic`: the demo uses it too.
"""
