"""Feed-forward blocks: gated (Llama's SwiGLU, Gemma's GeGLU) and plain (BERT)."""

from __future__ import annotations

from models.layers.activations import Activation, GatedActivation
from models.layers.base import Layer
from models.layers.linear import Linear


class GatedMLP(Layer):
    """down(act(gate(x)) * up(x)); `fused`: gate and up are one projection
    whose first half of rows is the gate's (Phi-3's gate_up_proj)."""

    def __init__(self, dim: int, hidden: int, activation: str = "silu", bias: bool = False,
                 fused: bool = False):
        super().__init__()
        if fused:
            self.gate_up_proj = Linear(dim, 2 * hidden, bias=bias)
        else:
            self.gate_proj = Linear(dim, hidden, bias=bias)
            self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)
        self.act = GatedActivation(activation)

    def forward(self, x):
        if "gate_up_proj" in self:
            h = self.gate_up_proj(x)
            half = h.shape[-1] // 2
            gate, up = h[..., :half], h[..., half:]
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(self.act(gate, up))


class MLP(Layer):
    """down(act(up(x)))."""

    def __init__(self, dim: int, hidden: int, activation: str = "gelu", bias: bool = True):
        super().__init__()
        self.up_proj = Linear(dim, hidden, bias=bias)
        self.down_proj = Linear(hidden, dim, bias=bias)
        self.act = Activation(activation)

    def forward(self, x):
        return self.down_proj(self.act(self.up_proj(x)))
