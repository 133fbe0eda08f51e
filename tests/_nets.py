"""Small test networks shared by several test files."""

import torch
import torch.nn.functional as F
from torch import nn


class CatNet(nn.Module):
    """torch.cat of two branches, a depthwise conv, a grouped conv and GroupNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn0 = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 6, 1)
        self.b = nn.Conv2d(8, 10, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.pw1 = nn.Conv2d(16, 24, 1)
        self.g = nn.Conv2d(24, 24, 3, padding=1, groups=4)
        self.gn = nn.GroupNorm(4, 24)
        self.pw2 = nn.Conv2d(24, 12, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn0(self.stem(x)))
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b(x))], 1)  # (B, 16, H, W)
        y = F.relu(self.bn1(self.dw(y)))
        y = F.relu(self.gn(self.g(self.pw1(y))))
        y = self.bn2(self.pw2(y))
        return self.fc(F.adaptive_avg_pool2d(y, 1).flatten(1))
