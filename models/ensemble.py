"""En_n: an ensemble that averages its members' logits (any architecture's members; the user's builder gets one)."""
from __future__ import annotations

import torch.nn as nn


class Ensemble(nn.Module):
    """En_n: the average of the members' logits."""

    def __init__(self, members):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        out = self.members[0](x)
        for m in self.members[1:]:
            out = out + m(x)
        return out / len(self.members)
