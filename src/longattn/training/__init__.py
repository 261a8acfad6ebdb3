"""What every training loop of longattn shares (LRA classifiers, language models).

``checkpoint``: nested state in one safetensors file, written atomically; ``distributed``: torchrun worlds,
DDP/FSDP2 wrapping and collectives; ``state``: model/optimizer/RNG state for exact resume, progress bars;
``run``: a run's progress, its checkpoint (refused when it belongs to another run) and result file.
"""
