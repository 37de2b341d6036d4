import pytest
import torch
import torchvision
from torch import nn

from dfqkit.models.cifar_resnet20 import cifar_resnet20
from dfqkit.models.mnist_resnet import mnist_resnet
from dfqkit.models.split import (
    cut_indices,
    feature_dims,
    find_blocks,
    pool_features,
    split_points,
)


def test_cut_indices_split_evenly_and_end_at_the_last_block():
    assert cut_indices(9, 3) == [2, 5, 8]
    assert cut_indices(8, 3) == [2, 4, 7]  # 8/3 = 2.67 → ends after blocks 3, 5, 8
    assert cut_indices(4, 1) == [3]
    assert cut_indices(16, 4) == [3, 7, 11, 15]
    with pytest.raises(ValueError, match="cannot split 2 blocks into 3 parts"):
        cut_indices(2, 3)
    with pytest.raises(ValueError, match="parts must be an integer >= 1"):
        cut_indices(4, 0)


def test_cifar_resnet20_splits_at_its_stage_ends():
    model = cifar_resnet20(num_classes=10, weights=None).eval()
    x = torch.randn(2, 3, 32, 32)
    blocks = find_blocks(model, x)
    assert len(blocks) == 9 and blocks[0] == "features.stage1.unit1"  # stem excluded
    names = split_points(model, 3, x)
    assert names == ["features.stage1.unit3", "features.stage2.unit3", "features.stage3.unit3"]
    assert feature_dims(model, names, x) == [16, 32, 64]


def test_mnist_resnet8_has_one_block_per_stage():
    model = mnist_resnet(depth=8, weights=None).eval()
    assert len(find_blocks(model, torch.randn(2, 1, 28, 28))) == 3


@pytest.mark.parametrize(
    ("factory", "count", "first", "last"),
    [
        (torchvision.models.resnet18, 8, "layer1.0", "layer4.1"),
        (torchvision.models.resnet50, 16, "layer1.0", "layer4.2"),
        (torchvision.models.mobilenet_v2, 18, "features.1", "features.18"),
    ],
)
def test_torchvision_blocks(factory, count, first, last):
    model = factory().eval()
    blocks = find_blocks(model, torch.randn(1, 3, 64, 64))
    assert (len(blocks), blocks[0], blocks[-1]) == (count, first, last)


def test_timm_cnn_and_vit_split_by_blocks():
    timm = pytest.importorskip("timm")
    cnn = timm.create_model("resnet10t", pretrained=False, num_classes=5).eval()
    assert split_points(cnn, 2, torch.randn(1, 3, 64, 64)) == ["layer2.0", "layer4.0"]
    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=6
    ).eval()
    x = torch.randn(1, 3, 32, 32)
    assert split_points(vit, 3, x) == ["blocks.1", "blocks.3", "blocks.5"]
    assert feature_dims(vit, ["blocks.5"], x) == [192]


def test_blocks_follow_execution_order_not_definition_order():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.late = nn.Identity()  # registers "late" first: definition order ≠ execution
            self.early = nn.Sequential(nn.Conv2d(1, 4, 1), _Block(4), _Block(4))
            self.late = nn.Sequential(_Block(4), _Block(4))

        def forward(self, x):
            return self.late(self.early(x)).mean((2, 3))

    net = Net()
    assert find_blocks(net) == ["late.0", "late.1", "early.1", "early.2"]  # definition order
    assert find_blocks(net, torch.randn(1, 1, 4, 4)) == ["early.1", "early.2", "late.0", "late.1"]


class _Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(x)


def test_a_model_without_blocks_is_refused():
    with pytest.raises(ValueError, match="no chain of blocks"):
        find_blocks(nn.Sequential(nn.Flatten(), nn.Linear(4, 2)))


class PlainCNN(nn.Module):
    """Convolutions as direct attributes, defined out of order, no BN (a small digit CNN)."""

    def __init__(self):
        super().__init__()
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.c1 = nn.Conv2d(1, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8, 8), nn.Linear(8, 10)

    def forward(self, x):
        x = torch.relu(self.c3(torch.relu(self.c2(torch.relu(self.c1(x))))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))


def test_a_plain_cnn_splits_at_its_convolutions_in_execution_order():
    model = PlainCNN()
    assert find_blocks(model, torch.zeros(1, 1, 8, 8)) == ["c1", "c2", "c3"]
    assert split_points(model, 3, torch.zeros(1, 1, 8, 8)) == ["c1", "c2", "c3"]


def test_pool_features_shapes():
    x = torch.arange(24.0).view(1, 2, 3, 4)
    torch.testing.assert_close(pool_features(x), x.mean((2, 3)))
    torch.testing.assert_close(pool_features(x, channels_last=True), x.mean((1, 2)))
    tokens = torch.randn(2, 5, 3)
    torch.testing.assert_close(pool_features(tokens), tokens.mean(1))
