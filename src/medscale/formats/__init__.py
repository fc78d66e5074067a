"""What prep writes and the loader reads: the one owner of the shard format.

- `medscale.formats.codec`: lossless pixel encodings (the ``pix.*`` members).
- `medscale.formats.sample`: a sample's members and metadata keys; the label is optional.
- `medscale.formats.tar`: tar writing (deterministic, hashed), header scanning and the per-shard
  member-offset index (``<shard>.idx.json``) written when prep closes a shard.
- `medscale.formats.manifest`: ``manifest.json``: schema, version check, read (local, patterns,
  remote), write and merge.
"""
