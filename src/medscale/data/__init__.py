"""Streaming input for training: shards to batches."""
