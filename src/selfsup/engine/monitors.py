"""Label-based monitors the engine computes from what a method exposes (methods never see labels)."""

from __future__ import annotations

import torch


@torch.no_grad()
def neighbour_purity(neighbours: torch.Tensor, indices: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean fraction of each image's neighbours (``neighbours``: (B, k) dataset indices, −1 for an empty slot)
    carrying the image's own label, over the images of the batch that have one (label ≥ 0).

    ISD's teacher neighbours and MSF's target neighbours (≥ 1/k there, through the self-match)."""
    own = targets[indices]
    found = torch.where(neighbours >= 0, targets[neighbours.clamp(min=0)], torch.full_like(neighbours, -1))
    same = (found == own.unsqueeze(1)).float().mean(dim=1)
    known = (own >= 0).float()
    return (same * known).sum() / known.sum().clamp(min=1.0)
