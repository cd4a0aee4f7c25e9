"""Time-aligned multi-view WebDataset shards: writing them (Ray Data) and reading them back."""
from engine.shards.dataset import clip_dataset, decode_sample, ray_dataset
from engine.shards.plan import ShardConfig

__all__ = ["ShardConfig", "clip_dataset", "decode_sample", "ray_dataset"]
