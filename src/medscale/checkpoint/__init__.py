"""Checkpoints and what leaves a run: complete-or-ignored checkpoints of stateful parts
(`checkpointer`), resuming them on another number of ranks (`universal`), loading nothing but
tensors (`safety`), the final fp32 weights with their preprocessing record (`weights`), and
`medscale export` to safetensors, config.json and ONNX (`export`)."""
