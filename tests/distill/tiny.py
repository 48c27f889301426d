"""A tiny torchvision-style ResNet and a quickly trained teacher on 16x16 digits, shared by the distill tests."""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.data import DataLoader
from torchvision.models.resnet import BasicBlock

from distill.data import load_digits
from distill.teacher import train_classifier


class TinyResNet(nn.Module):
    """layer1..layer3 Sequentials of BasicBlocks, so the ResNet slice presets apply."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        w = width
        self.conv1 = nn.Conv2d(3, w, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(w)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(w, w), BasicBlock(w, w))
        down = nn.Sequential(nn.Conv2d(w, 2 * w, 1, stride=2, bias=False), nn.BatchNorm2d(2 * w))
        self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, stride=2, downsample=down))
        down3 = nn.Sequential(nn.Conv2d(2 * w, 4 * w, 1, stride=2, bias=False), nn.BatchNorm2d(4 * w))
        self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, stride=2, downsample=down3))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.avgpool(x), 1))


@functools.lru_cache(maxsize=1)
def digits16():
    return load_digits(image_size=16)


@functools.lru_cache(maxsize=2)
def _trained(width: int) -> dict:
    train, _ = digits16()
    net = TinyResNet(width)
    torch.manual_seed(0)
    train_classifier(net, train, epochs=3, lr=5e-3, seed=0, progress=False)
    return {k: v.clone() for k, v in net.state_dict().items()}


def tiny_teacher(width: int = 16) -> nn.Module:
    """A TinyResNet trained for a few seconds on 16x16 digits (cached per process), in eval mode."""
    net = TinyResNet(width)
    net.load_state_dict(_trained(width))
    return net.eval()


def calib_loader(n: int = 256, batch_size: int = 32) -> DataLoader:
    train, _ = digits16()
    sub = torch.utils.data.Subset(train, list(range(n)))
    return DataLoader(sub, batch_size=batch_size, shuffle=False)


def held_out_loader(batch_size: int = 256) -> DataLoader:
    return DataLoader(digits16()[1], batch_size=batch_size)
