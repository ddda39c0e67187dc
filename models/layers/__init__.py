"""The layers model files are built from. Each is portable MLX; platforms
attach faster host implementations per layer (engine/platform), so every
model composed of these gets them without code of its own."""

from models.layers.activations import Activation, GatedActivation
from models.layers.attention import Attention
from models.layers.base import BaseModelArgs, Layer, is_host
from models.layers.embedding import Embedding
from models.layers.linear import Linear
from models.layers.mlp import MLP, GatedMLP
from models.layers.norm import LayerNorm, RMSNorm
from models.layers.rope import RoPE
from models.layers.softcap import SoftCap

__all__ = ["Activation", "Attention", "BaseModelArgs", "Embedding", "GatedActivation",
           "GatedMLP", "Layer", "LayerNorm", "Linear", "MLP", "RMSNorm", "RoPE", "SoftCap",
           "is_host"]
