"""The classification head visionflow puts on every backbone (torchvision's or its own)."""

from __future__ import annotations

from torch import nn


def transfer_head(in_features: int, num_classes: int, *, hidden_dim: int = 512, dropout: float = 0.3) -> nn.Sequential:
    """Dropout -> Linear -> ReLU -> Dropout -> Linear, the notebook's head."""
    head = nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_features, hidden_dim),
        nn.ReLU(inplace=True),
        nn.Dropout(dropout),
        nn.Linear(hidden_dim, num_classes),
    )
    head.is_transfer_head = True  # how _head_attr tells our head from a torchvision classifier
    return head
