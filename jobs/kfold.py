"""`ray job submit` entry point for K-fold cross-validation: it takes the options of `distml kfold`.

    RAY_AUTH_MODE=token ray job submit --address http://127.0.0.1:8265 --working-dir . \\
        --runtime-env jobs/runtime_env.yaml -- python jobs/kfold.py --k 5 --workers 8 --storage /mnt/distml

Inside a job Ray sets RAY_ADDRESS, so distml joins the cluster the job runs in and starts no Ray of its own.
Outside a job, `python jobs/kfold.py --help` lists the options and a small run uses a local Ray.
"""

import sys

from distml.cli import run_command

if __name__ == "__main__":
    run_command("kfold", sys.argv[1:])
