"""A tiny two-input, two-output torch model for MLflow plumbing tests (not a real model)."""

import torch
from torch import nn


class TwoInputNet(nn.Module):
    def __init__(self, n_tab: int = 3, hidden: int = 8) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, hidden, 3, padding=1)
        self.tab = nn.Linear(n_tab, hidden)
        self.head = nn.Linear(hidden, 1)
        self.decoder = nn.Conv2d(hidden, 1, 1)

    def forward(self, image: torch.Tensor, table: torch.Tensor) -> dict[str, torch.Tensor]:
        f = torch.relu(self.conv(image))
        t = torch.relu(self.tab(table))
        fused = f + t[:, :, None, None]
        return {"gpr": self.head(fused.mean(dim=(2, 3))).squeeze(1), "dd_map": self.decoder(fused)}
