"""SimSiam (Chen & He, CVPR 2021) as a selfsup plugin: a new method is one file.

    PYTHONPATH=docs/examples selfsup train quickstart imports=[simsiam] method=simsiam

L = ½ D(p₁, sg(z₂)) + ½ D(p₂, sg(z₁)), D(p, z) = −cos(p, z); z = projector(f(x)), p = predictor(z).
"""

from dataclasses import dataclass

import torch.nn.functional as F

from selfsup.config import MethodConfig
from selfsup.methods import Method, StepOutput, register_method
from selfsup.models.heads import mlp


@dataclass
class SimSiamConfig(MethodConfig):
    name: str = "simsiam"  # method=simsiam
    dim: int = 2048  # projector output (the paper's ImageNet value)
    pred_dim: int = 512  # predictor bottleneck


def negative_cosine(p, z):
    return -(F.normalize(p, dim=1) * F.normalize(z.detach(), dim=1)).sum(dim=1).mean()  # stop-gradient on z


@register_method(SimSiamConfig)
class SimSiam(Method):
    def __init__(self, cfg: SimSiamConfig, backbone, run):
        super().__init__(cfg, run)
        self.encoder, width = backbone()
        self.projector = mlp([width, cfg.dim, cfg.dim])
        self.predictor = mlp([cfg.dim, cfg.pred_dim, cfg.dim])

    @property
    def backbone(self):
        return self.encoder

    def training_step(self, batch):
        z1, z2 = (self.projector(self.encoder(x)) for x in batch.views)  # views: 2 x aug+ (the default)
        p1, p2 = self.predictor(z1), self.predictor(z2)
        return StepOutput((negative_cosine(p1, z2) + negative_cosine(p2, z1)) / 2)
