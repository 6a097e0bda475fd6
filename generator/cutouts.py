"""Random augmented crops ("cutouts") of the image, the views CLIP judges each step."""

from __future__ import annotations

import kornia.augmentation as K
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Standard deviation cap of the gaussian noise added to each cutout.
NOISE_MAX = 0.1


class MakeCutouts(nn.Module):
    """Cut ``cutn`` random square crops of an image and resize them to CLIP's input size.

    Crop sides are ``int(u ** cut_pow * (max_size - min_size) + min_size)`` for
    ``u`` uniform in [0, 1), with ``max_size`` the image's shorter side and
    ``min_size = min(max_size, cut_size)``, so a larger ``cut_pow`` favours
    small crops. Each crop is resized with an even mix of area (average) and
    max pooling, then randomly flipped, turned, warped, recoloured and noised.
    All randomness comes from torch's global generators, so a seeded run repeats.
    """

    def __init__(self, cut_size: int, cutn: int, cut_pow: float = 1.0) -> None:
        super().__init__()
        self.cut_size = cut_size
        self.cutn = cutn
        self.cut_pow = cut_pow
        self.augment = nn.Sequential(
            K.RandomHorizontalFlip(p=0.5),
            K.RandomAffine(degrees=15, translate=(0.1, 0.1), p=0.7, padding_mode="border"),
            K.RandomPerspective(distortion_scale=0.7, p=0.7),
            K.ColorJitter(hue=0.1, saturation=0.1, p=0.7),
        )

    def forward(self, image: Tensor) -> Tensor:
        """Return (cutn, C, cut_size, cut_size) crops of ``image`` (1, C, H, W) in [0, 1]."""
        height, width = image.shape[2:4]
        max_size = min(height, width)
        min_size = min(max_size, self.cut_size)

        crops = []
        for _ in range(self.cutn):
            size = int(torch.rand([]) ** self.cut_pow * (max_size - min_size) + min_size)
            left = int(torch.randint(0, width - size + 1, ()))
            top = int(torch.randint(0, height - size + 1, ()))
            crop = image[:, :, top : top + size, left : left + size]
            crops.append(self._resize(crop))
        batch = self.augment(torch.cat(crops))

        noise_scale = batch.new_empty([self.cutn, 1, 1, 1]).uniform_(0, NOISE_MAX)
        return batch + noise_scale * torch.randn_like(batch)

    def _resize(self, crop: Tensor) -> Tensor:
        # Average pooling keeps the overall colour and max pooling keeps thin
        # bright detail. Both are exact when the crop already has cut_size.
        output = (self.cut_size, self.cut_size)
        return (F.adaptive_avg_pool2d(crop, output) + F.adaptive_max_pool2d(crop, output)) / 2


def normalize(batch: Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> Tensor:
    """Normalise a (N, 3, H, W) batch in [0, 1] with CLIP's per-channel mean and std."""
    mean_tensor = batch.new_tensor(mean).view(1, -1, 1, 1)
    std_tensor = batch.new_tensor(std).view(1, -1, 1, 1)
    return (batch - mean_tensor) / std_tensor
