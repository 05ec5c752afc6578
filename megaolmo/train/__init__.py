"""Training: `python -m megaolmo.train` (__main__.py, the Hydra entry point) and what it is made of.

loop.py          the loop: train_step, evaluation, checkpoints, the stop signal
checkpointer.py  saving, retention and resuming (megaolmo.checkpoint's sharded format)
run_log.py       rank 0's metrics.jsonl, TensorBoard/W&B, progress bar, loss plot and summary
optim.py         AdamW with OLMo's parameter groups; OLMo's learning-rate and clipping schedules
preemption.py    a stop at the step boundary on Slurm's signal, exit 75 to requeue
sweep.py         Hydra multiruns: a directory per point, the closing summary
"""
