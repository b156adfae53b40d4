import math

import torch

from pipeline_infp.metrics import psnr, ssim


def images(seed=0, batch=2, size=32):
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_ssim_is_one_for_identical_images_symmetric_and_lower_for_noise():
    x, y = images(0), images(1)
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    assert torch.allclose(ssim(x, y), ssim(y, x), atol=1e-6)
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert torch.all(ssim(x, noisy) < 0.99) and torch.all(ssim(x, noisy) > ssim(x, y))


def test_ssim_of_constant_images_follows_the_luminance_term():
    a, b = torch.full((1, 1, 16, 16), 0.2), torch.full((1, 1, 16, 16), 0.6)
    expected = (2 * 0.2 * 0.6 + 0.01**2) / (0.2**2 + 0.6**2 + 0.01**2)  # no variance: only luminance remains
    assert math.isclose(ssim(a, b).item(), expected, rel_tol=1e-4)


def test_ssim_is_differentiable():
    x, y = images(0).requires_grad_(), images(1)
    (1 - ssim(x, y).mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_psnr_of_a_known_error():
    x = torch.zeros(1, 3, 8, 8)
    assert math.isclose(psnr(x, x + 0.1).item(), 20.0, rel_tol=1e-4)
    assert psnr(x, x).item() > 90
