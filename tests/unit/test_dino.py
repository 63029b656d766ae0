"""iBOT's pieces of the DINO task: the student cannot see a masked patch, and masks are drawn as
DINOv2's collate draws them (a fixed share of the crops, ratios spread over the range)."""

import torch

from lvmtrain.models.vit import VisionTransformer
from lvmtrain.tasks.dino import draw_masks


def test_a_masked_patch_is_invisible_and_no_mask_changes_nothing():
    torch.manual_seed(0)
    vit = VisionTransformer(image_size=16, patch_size=4, width=32, depth=2, num_heads=2, num_classes=0,
                            global_pool="avg").eval()
    token = torch.randn(32)
    x = torch.randn(2, 3, 16, 16)
    masks = torch.zeros(2, 16, dtype=torch.bool)
    torch.testing.assert_close(vit.forward_features(x, masks, token), vit.forward_features(x), rtol=0, atol=0)

    masks[0, 5] = True  # patch 5: row 1, column 1 of the 4 x 4 grid
    changed = x.clone()
    changed[0, :, 4:8, 4:8] += 1.0
    masked = vit.forward_features(x, masks, token)
    torch.testing.assert_close(vit.forward_features(changed, masks, token), masked, rtol=0, atol=0)
    assert not torch.equal(masked, vit.forward_features(x))  # the token took the patch's place
    assert not torch.equal(vit.forward_features(changed), vit.forward_features(x))  # unmasked, it shows


def test_masks_cover_the_share_of_crops_with_ratios_spread_over_the_range():
    torch.manual_seed(0)
    masks = draw_masks(40, 49, 0.5, 0.1, 0.5, "cpu")
    counts = masks.sum(1)
    assert (counts > 0).sum() == 20
    masked = counts[counts > 0].sort().values
    assert masked.min() >= 4 and masked.max() <= 25  # 0.1 x 49 and 0.5 x 49, rounded
    assert masked[:10].float().mean() < masked[10:].float().mean()  # spread, not all alike
    assert draw_masks(1, 9, 0.01, 0.1, 0.1, "cpu").sum() == 1  # at least one crop, one patch
