"""`ray job submit` entry point for a hyperparameter sweep: it takes the options of `distml sweep`.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- python jobs/sweep.py --storage /mnt/distml

Inside a job Ray sets RAY_ADDRESS, so distml joins the cluster the job runs in and starts no Ray of its own.
Outside a job, `python jobs/sweep.py --help` lists the options and a small run uses a local Ray.
"""

import sys

from distml.cli import run_command

if __name__ == "__main__":
    run_command("sweep", sys.argv[1:])
