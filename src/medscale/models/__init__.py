"""Models as plain ``nn.Module``s: timm architectures by name, local weights only; no DeepSpeed here."""

from medscale.models.factory import create_mae_model, create_model, load_weights

__all__ = ["create_model", "create_mae_model", "load_weights"]
