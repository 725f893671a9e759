"""The one training loop: precision, optimizer, schedules, loss, accumulation,
checkpoints, resume, distributed, logging, plots.

    from trainformer.training.trainer import Trainer
    summary = Trainer(cfg, task, run_dir).fit()
"""
