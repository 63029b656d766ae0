"""SigLIP (Zhai et al. 2023): a sigmoid loss over every image-text pair, with a learnable
temperature (init log 10) and bias (init -10), computed across ranks in a ring (see
`siglip_loss.py`): memory per rank stays that of one local block whatever the world size."""

from __future__ import annotations

import math

from torch import Tensor

from lvmtrain.tasks.contrastive import ContrastiveTask
from lvmtrain.tasks.siglip_loss import siglip_loss_ring

INIT_LOGIT_SCALE, INIT_LOGIT_BIAS = math.log(10), -10.0


class SigLipTask(ContrastiveTask):
    """batch {"image", "text"} -> {"loss", "logit_scale", "logit_bias"}."""

    name = "siglip"
    scalar_keys = ("logit_scale", "logit_bias")

    def model_args(self) -> dict:
        return {"init_logit_scale": INIT_LOGIT_SCALE, "init_logit_bias": INIT_LOGIT_BIAS}

    def loss(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        loss = siglip_loss_ring(features["image_features"], features["text_features"], features["logit_scale"],
                                features["logit_bias"])
        return {"loss": loss, "logit_scale": features["logit_scale"].detach().reshape(()),
                "logit_bias": features["logit_bias"].detach().reshape(())}
