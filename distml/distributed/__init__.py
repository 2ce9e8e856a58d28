"""The distributed layer: the one package that imports ray. Nothing in it imports a workflow or the CLI.

- `cluster`: connect and shut down (the start-up speed measures live there), the nodes, planning trainers onto
  them, the shared-storage check, and the watch that ends a run whose cluster lost its room.
- `worker`: what runs inside a Ray worker: tensors from the object store, the one checkpoint format, the epoch
  and fold reports, the one-line error.
- `fold_actors`: fold trainer actors and their retry loop (kfold's default path).
- `ddp`: the one DDP worker body, for DDP folds and the fine-tune's TorchTrainer.
- `tune`: Ray Tune trials (the learning-rate sweep, DDP folds as trials) and their progress callback.

Each Ray call is marked `# ray:` so it is easy to find; the training itself is `distml.train`'s plain loop.
"""

import os

# Before any ray import below: never phone home or prompt; Tune prints nothing of its own with verbose=0; and Tune's
# default TensorBoard logger, which imports torch into the driver (seconds of start-up), stays off: tune.py adds the
# CSV and JSON loggers back by hand
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
