"""Streaming input for training: shards to batches (the shard format itself is `medscale.formats`).

- `medscale.data.order`: the epoch's global order and its split over ranks (pure functions).
- `medscale.data.reader`: raw samples by (shard, index): random access through the shards'
  index files (or a header scan), download cache, streams; labels for class balancing.
- `medscale.data.transforms`: pixels to tensors (windows, normalisation, augmentation): each
  sample's parameters drawn in the worker, the ops applied there or batched on the device.
- `medscale.data.device`: `to_device`, where a batch meets the model's device (and the gpu path's
  transforms run).
- `medscale.data.loader`: `ShardStream`, `make_loader`: batches (labels optional), resume state,
  corrupt accounting.
- `medscale.data.collate`: a worker's samples to one batch; `medscale.data.shm`: the shared-memory
  buffers batches cross to the rank in.
"""
