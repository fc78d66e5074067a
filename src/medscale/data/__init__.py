"""Streaming input for training: shards to batches (the shard format itself is `medscale.formats`).

- `medscale.data.order`: the epoch's global order and its split over ranks (pure functions).
- `medscale.data.reader`: raw samples by (shard, index): random access through the shards'
  index files (or a header scan), download cache, streams; labels for class balancing.
- `medscale.data.transforms`: pixels to tensors (windows, normalisation, augmentation).
- `medscale.data.loader`: `ShardStream`, `make_loader`: batches (labels optional), resume state,
  corrupt accounting.
"""
