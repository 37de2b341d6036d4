import pytest
import torch

from dfqkit.data import digits
from dfqkit.generators import PixelBank, synthesize
from dfqkit.mixers import NoMixer


def test_bank_returns_all_images_with_fixed_pseudo_labels_and_clips_pixels():
    data = digits()
    bank = PixelBank(data=data, num_images=6, jitter=0, flip=False, seed=3)
    a = synthesize(bank, NoMixer(), 6, torch.device("cpu"))
    b = synthesize(bank, NoMixer(), 6, torch.device("cpu"))
    assert torch.equal(a.labels, b.labels) and torch.equal(a.images, bank.pixels)
    with torch.no_grad():
        bank.pixels.fill_(100.0)
    bank.after_step()
    high = (1 - data.mean[0]) / data.std[0]
    torch.testing.assert_close(bank.pixels, torch.full_like(bank.pixels, high))
    with pytest.raises(ValueError, match="set the batch size to it"):
        bank.sample(5, torch.device("cpu"))


def test_jitter_rolls_the_whole_batch_and_gradients_reach_the_pixels():
    torch.manual_seed(0)
    bank = PixelBank(data=digits(), num_images=4, jitter=2, flip=False)
    batch = bank.sample(4, torch.device("cpu"))
    images = bank.decode(batch)
    shifts = [(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)]
    assert any(torch.equal(images, torch.roll(bank.pixels, s, (2, 3))) for s in shifts)
    images.sum().backward()
    assert bank.pixels.grad is not None and bank.pixels.grad.abs().sum() > 0
