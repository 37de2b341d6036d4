import pytest
import torch

from dfqkit.models.mnist_resnet import mnist_resnet


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return mnist_resnet(depth=8, weights=None).eval().requires_grad_(False)
