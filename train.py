"""Train a MoCo embedding with a timm backbone, on one device or many.

    python train.py                                    # the bundled sample, ~30 s on CPU
    python train.py --data ./shards --out runs/ft --preset finetune  # ImageNet weights, tuned (CPU ok)
    python train.py --data ./shards --out runs/r50 --preset v100x8
    torchrun --nproc_per_node=8 train.py --data ./shards --out runs/r50 --preset h100
    python train.py --data ./shards --out runs/r50 --resume auto   # after a crash
    python train.py --config runs/sample/config.json --out runs/again --log-level info

Every flag is a field of ``ecomaug.config.TrainConfig`` (``--help`` lists them); ``ecomaug
train`` takes the same flags and runs the same engine. One run, phase by phase
(``ecomaug/engine/trainer.py``):

1. setup      check every input, plan the epochs from the shard counts, build the objective
              (``ecomaug/moco.py``, or the supervised ``ecomaug/siamese.py``), the recipe and
              the optimizer; resume from a checkpoint when asked.
2. step       per batch: shards -> ``loaders.build_loader`` (uint8 crops on the device) ->
              the recipe (two augmented views) -> ``ecomaug.normalise`` -> the objective's loss
              -> backward -> optimizer and LR schedule (``ecomaug/engine/step.py``).
3. checkpoint every ``--checkpoint-every`` steps and at each epoch end (``RUN/checkpoints``);
              SIGTERM/SIGINT save one at the step boundary and stop.
4. finish     export the backbone (``RUN/export``) and print the held-out kNN recall@1 of the
              trained backbone against a random-init one.

This file is a script, not a module: import :mod:`ecomaug.engine` instead.
"""

import sys

if __name__ == "__main__":
    try:  # importing torch and timm takes seconds: a Ctrl-C then is one line too, not a traceback
        from ecomaug.engine import main

        sys.exit(main(prog="train.py"))
    except KeyboardInterrupt:
        from ecomaug.cli import INTERRUPTED_EXIT_CODE, INTERRUPTED_MESSAGE

        print(INTERRUPTED_MESSAGE, file=sys.stderr)
        sys.exit(INTERRUPTED_EXIT_CODE)
