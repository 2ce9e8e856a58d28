import subprocess
import sys

from distml.config import MODEL_NAMES
from distml.models import MODELS


def test_config_knows_every_model():
    assert set(MODEL_NAMES) == set(MODELS) | {"resnet18"}  # resnet18 is built in resnet.py, above models.py


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


def test_the_kfold_command_reaches_ray_without_the_reports_libraries():
    """What `distml kfold` imports before it starts Ray: the CLI runs the workflow with Ray's start replaced by a
    stop, and the report's libraries (pandas, scipy, matplotlib: a second or two) must not be loaded by then."""
    code = (
        "import sys\n"
        "from distml.distributed import cluster\n"
        "class Stop(Exception): pass\n"
        "def stop(*a, **k):\n"
        "    loaded = sorted(m for m in ('pandas', 'scipy', 'matplotlib', 'torch') if m in sys.modules)\n"
        "    sys.__stdout__.write(f'{loaded}\\n'); raise Stop\n"
        "cluster.connect = stop\n"
        "from typer.testing import CliRunner\n"
        "from distml.cli import app\n"
        "from distml.data import SAMPLE_DIR\n"
        "CliRunner().invoke(app, ['kfold', '--data-dir', str(SAMPLE_DIR), '--out', sys.argv[1]])\n"
    )
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        out = subprocess.run(
            [sys.executable, "-c", code, f"{folder}/run"], capture_output=True, text=True, check=True
        ).stdout
    assert out.strip().splitlines()[0] == "[]"


def test_the_public_verbs_stay_verbs_after_their_namesake_modules_are_imported():
    """`distml.predict` is a function and `distml/predict.py` a module (likewise train, finetune, sweep, compare):
    importing the module must not replace the function on the package."""
    code = (
        "import distml, distml.train, distml.finetune, distml.sweep, distml.compare, distml.predict, sys\n"
        "print([callable(getattr(distml, n)) and getattr(distml, n).__module__ == 'distml.api'"
        " for n in ('train', 'finetune', 'sweep', 'compare', 'predict')])\n"
        "print(sys.modules['distml.train'].fit.__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["[True,", "True,", "True,", "True,", "True]", "fit"]
