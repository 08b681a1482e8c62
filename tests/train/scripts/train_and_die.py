"""Run a training config in this process and SIGKILL it at a chosen moment (used by test_train_resume).

python train_and_die.py RUN.yaml [--resume] [--kill-after-step N] [--kill-in-checkpoint-at-step N]
"""

import argparse
import os
import signal

import torch

from upcycle.train import Callback, TrainConfig, Trainer, checkpoint


class KillAfter(Callback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, trainer, record):
        if trainer.progress.step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def die_inside_checkpoint_write(step):
    """Write the checkpoint's files, then die before the rename that would publish them."""
    original = checkpoint._fsync_dir

    def fsync_then_die(folder):
        original(folder)
        if folder.name == f".tmp-step-{step:06d}":
            os.kill(os.getpid(), signal.SIGKILL)

    checkpoint._fsync_dir = fsync_then_die


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--kill-after-step", type=int)
    parser.add_argument("--kill-in-checkpoint-at-step", type=int)
    args = parser.parse_args()
    torch.set_num_threads(1)  # same threads, same numbers
    callbacks = [KillAfter(args.kill_after_step)] if args.kill_after_step else []
    if args.kill_in_checkpoint_at_step:
        die_inside_checkpoint_write(args.kill_in_checkpoint_at_step)
    Trainer(TrainConfig.from_yaml(args.config), callbacks=callbacks).fit(resume=args.resume)
