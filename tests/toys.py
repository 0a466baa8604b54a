"""Small networks shared by the calibration and allocation tests (not a test module)."""

import torch
from torch import nn
from torch.nn import functional as F


class ToyNet(nn.Module):
    """Convs with BN and in-place ReLUs (which once corrupted captured targets), and a skip."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv3 = nn.Conv2d(8, 6, 3, stride=2, padding=1)
        self.head = nn.Linear(6, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(self.bn2(self.conv2(x)) + x)
        return self.head(F.relu(self.conv3(x)).mean((2, 3)))


def toy(seed=0):
    torch.manual_seed(seed)
    net = ToyNet()
    for bn in (net.bn1, net.bn2):
        bn.running_mean.uniform_(-0.3, 0.3)
        bn.running_var.uniform_(0.5, 2)
    return net.double().eval()


def images(n=64):
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def calibrated_change(net, ref, x, **kwargs):
    """Calibrate ``net`` against ``ref`` on ``x``: its relative output change from ``ref`` before,
    the records, and the change after."""
    from decouple.calibrate.layerwise import calibrate_

    with torch.no_grad():
        before = float((net(x) - ref(x)).norm() / ref(x).norm())
        records = calibrate_(net, ref, x, **kwargs)
        after = float((net(x) - ref(x)).norm() / ref(x).norm())
    return before, records, after
