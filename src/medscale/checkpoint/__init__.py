"""Checkpoints and what leaves a run: complete-or-ignored checkpoints of stateful parts
(`checkpointer`), resuming them on another number of ranks (`universal`), loading nothing but
tensors (`safety`), the final fp32 weights with their preprocessing record (`weights`), and
`medscale export` (`export`): the fp32 master weights read from DeepSpeed's files one tensor at a
time (`zero_weights`), safetensors written tensor by tensor (`safetensors_io`), ONNX with a parity
check (`onnx`)."""
