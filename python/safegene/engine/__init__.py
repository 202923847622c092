"""The bridge to the torch-free C++/CUDA core: tensors to raw spans (``native``) and streaming
plans over checkpoints (``stream``)."""
