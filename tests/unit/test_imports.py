import subprocess
import sys

from distml.config import MODEL_NAMES
from distml.models import MODELS


def test_config_knows_every_model():
    assert set(MODEL_NAMES) == set(MODELS)


def test_the_driver_does_not_import_torch():
    """The driver only schedules; torch's import would add seconds to every run's start-up."""
    code = (
        "import sys, distml.cli, distml.kfold, distml.distributed.cluster, distml.distributed.fold_actors; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_a_kfold_driver_starts_without_tune_train_or_the_reports_libraries():
    """One trainer per fold needs Ray's core only (Tune and Train would add about two seconds to the start), and
    pandas, scipy, scikit-learn and matplotlib load while the folds train, not before Ray starts."""
    heavy = ("ray.tune", "ray.train", "pandas", "scipy", "sklearn", "matplotlib", "torch")
    code = (
        "import sys, distml.cli, distml.kfold, distml.distributed.cluster, distml.distributed.fold_actors; "
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
