"""Parallelism applied around the plain model: process groups and the DeepSpeed engine.

``distributed.py`` starts torch.distributed for a single process, ``torchrun``, the
``deepspeed`` launcher or ``srun``; ``engine.py`` turns the typed config into DeepSpeed's JSON
config and wraps the model and optimizer in a DeepSpeed engine (ZeRO stage, bf16);
``expert_parallel.py`` splits the routed experts over ranks; ``pipeline.py`` cuts the blocks
into pipeline stages (DeepSpeed's ``PipelineModule``).
"""
