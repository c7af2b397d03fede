"""Test-only: run `diffcse-train` and SIGKILL this process once training step N is done.

    python tests/support/kill_after_step.py N --config cut.yaml [diffcse-train options]
    torchrun --nproc_per_node 2 tests/support/kill_after_step.py N --config cut.yaml

Everything step N does (its metrics line, an evaluation or checkpoint due at N) happens
first: the kill comes as step N+1 starts, on every process. The crash switch lives here, in
the tests, so the public config has none.
"""

from __future__ import annotations

import os
import signal
import sys

from diffcse_train import cli
from diffcse_train.trainer import Trainer


def kill_after(step: int) -> None:
    """Patch Trainer.train_step to SIGKILL the process before training step `step` + 1."""
    real = Trainer.train_step

    def train_step(self: Trainer, batch: dict) -> dict:
        if self.state.step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(self, batch)

    Trainer.train_step = train_step


if __name__ == "__main__":
    kill_after(int(sys.argv[1]))
    cli.main(sys.argv[2:])
