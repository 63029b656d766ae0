"""lvmtrain: pretraining for large vision models (ViT, CLIP) on WebDataset shards."""

__version__ = "0.1.0"
