"""Human-facing output: console tables of manifests and evaluation results, `medscale inspect`."""
