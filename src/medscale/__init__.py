"""medscale: train vision transformers on medical-imaging corpora with DeepSpeed and WebDataset."""

__version__ = "0.1.0"
