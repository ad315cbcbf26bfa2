"""One base class for a user's mistakes (`fpn_tf.errors.UserError`) and one handler: every error
class of the library derives from it, and every command turns it into one line and exit 2."""

import ast
import importlib
import os
import pathlib
import sys

import pytest
import watched

from fpn_tf import cli
from fpn_tf.errors import UserError

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Every command, with its required flags.
ENTRY_POINTS = {
    "fpn_tf.train": [],
    "fpn_tf.export": ["--model_dir=m", "--export_dir=e"],
    "fpn_tf.predict": ["--saved_model=m", "--image=i.png", "--output_dir=o"],
    "fpn_tf.convert_weights": ["--source=detectron2", "--checkpoint=c", "--output_dir=o"],
    "fpn_tf.ablations": [],
    "fpn_tf.data.convert_coco": ["--annotation_file=a", "--image_dir=i", "--output_prefix=o"],
}


def _error_classes():
    """(module, class name) of every ``class ...Error`` in fpn_tf/."""
    for path in sorted((ROOT / "fpn_tf").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ClassDef) and node.name.endswith("Error"):
                yield module, node.name


def test_every_error_class_of_the_library_is_a_user_error():
    found = list(_error_classes())
    assert len(found) >= 8, found  # config, data, model dir, checkpoint, export, ...
    for module, name in found:
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, UserError), f"{module}.{name} does not derive from UserError"


@pytest.mark.parametrize(
    "error,line",
    [
        (UserError("train.learning_rate: must be > 0"), "error: train.learning_rate: must be > 0"),
        (UserError("two\nlines"), "error: two; lines"),
        (FileNotFoundError("x.json"), "error: FileNotFoundError: x.json"),
    ],
)
def test_run_main_turns_a_user_error_into_one_line_and_exit_2(error, line, capfd):
    def body():
        raise error

    with pytest.raises(SystemExit) as exited:
        cli.run_main(["prog"], body)
    assert exited.value.code == 2
    lines = [l for l in capfd.readouterr().err.splitlines() if l.startswith("error:")]
    assert lines == [line]


def test_run_main_keeps_a_bug_s_traceback():
    def body():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run_main(["prog"], body)
    assert cli.run_main(["prog"], lambda x: x + 1, 1) == 2


def _run_command(module, *args):
    """``python -m module args`` (waited on while it makes progress, `watched.run`) and its
    stderr lines that start with ``error:``."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(ROOT))
    ran = watched.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env)
    return ran, [l for l in ran.stderr.splitlines() if l.startswith("error:")]


@pytest.mark.parametrize("mistake", ["stray", "--no_such_flag=1"])
def test_every_command_rejects_a_stray_argument_or_unknown_flag_with_exit_2(mistake):
    for module, required in ENTRY_POINTS.items():
        ran, errors = _run_command(module, *required, mistake)
        assert ran.returncode == 2 and len(errors) == 1, (module, ran.stderr[-2000:])
        assert mistake.strip("-").split("=")[0] in errors[0], (module, errors)
        assert "Traceback" not in ran.stderr, module


def test_an_unknown_ablation_row_is_one_line_and_exit_2():
    ran, errors = _run_command("fpn_tf.ablations", "--rows=nope")
    assert ran.returncode == 2 and len(errors) == 1 and "nope" in errors[0], ran.stderr[-2000:]
