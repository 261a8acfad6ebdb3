"""What every training loop of longattn shares (LRA classifiers, the byte LM, vision backbones).

``setup``: the start and end of a run (``RunSpec`` -> ``start`` -> ``Trainer``: world, seeded model, wrapping,
optimizer, identity, resume, progress, the step loop, the result); ``run``: a run's progress, the step loop
(``train_steps``), its checkpoint (refused when it belongs to another run) and result file; ``checkpoint``:
nested state in one safetensors file, written atomically; ``distributed``: torchrun worlds, DDP/FSDP2 wrapping
and collectives; ``state``: model/optimizer/RNG state for exact resume; ``progress``: the one progress bar.
"""
