"""The built wheel, installed into a clean environment, works outside the checkout."""

import glob
import json
import os
import re
import shutil
import subprocess
import sys
import zipfile

import pytest

import clars_tf

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(command, cwd, env=None, timeout=600):
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            timeout=timeout, env=env)
    assert result.returncode == 0, (command, result.stdout[-2000:],
                                    result.stderr[-3000:])
    return result


def _copy_of_tracked_files(destination):
    """The checkout's git-tracked files (symlinks kept as links).

    The wheel is built from this copy, not the checkout: a stale build/
    folder there would put deleted files in it, and building in place would
    rewrite metadata other tests' processes read.
    """
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO,
                            capture_output=True, check=True).stdout
    for relative in listed.decode().split("\0"):
        source = os.path.join(REPO, relative)
        if not relative or not os.path.lexists(source):
            continue  # deleted in the work tree, not yet committed
        target = os.path.join(destination, relative)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        if os.path.islink(source):
            os.symlink(os.readlink(source), target)
        else:
            shutil.copy2(source, target)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    source = tmp_path_factory.mktemp("source")
    _copy_of_tracked_files(str(source))
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps",
          "--no-build-isolation", "-q", "-w", str(out), str(source)],
         cwd=str(source))
    (path,) = glob.glob(str(out / "clars_tf-*.whl"))
    return path


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory):
    """A fresh virtual environment with the wheel and nothing of the checkout.

    TensorFlow, pip and the other dependencies come from this interpreter's
    site-packages (a .pth file lists them, as --system-site-packages does
    for a system interpreter), not reinstalled. The checkout's own editable
    install is not visible there: directories a .pth file adds are not
    scanned for further .pth files.
    """
    env_dir = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)],
         cwd=str(env_dir))
    python = str(env_dir / "bin" / "python")
    own_site = _run([python, "-c", "import sysconfig; "
                     "print(sysconfig.get_paths()['purelib'])"],
                    cwd=str(env_dir)).stdout.strip()
    parent_sites = [path for path in sys.path if path != own_site and
                    os.path.basename(path) in ("site-packages",
                                               "dist-packages")]
    with open(os.path.join(own_site, "parent_environment.pth"), "w") as f:
        f.write("".join(path + "\n" for path in parent_sites))
    _run([python, "-m", "pip", "install", "-q", "--no-deps",
          "--ignore-installed", "--disable-pip-version-check", wheel],
         cwd=str(env_dir))
    outside = tmp_path_factory.mktemp("elsewhere")
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(TF_CPP_MIN_LOG_LEVEL="2", PATH=f"{env_dir / 'bin'}:{env['PATH']}")
    return python, str(env_dir / "bin" / "clars-train"), str(outside), env


def test_wheel_holds_only_the_clars_tf_package_and_its_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {
        "clars_tf", f"clars_tf-{clars_tf.__version__}.data"}
    assert [name for name in names if ".data/" in name] == [
        f"clars_tf-{clars_tf.__version__}.data/scripts/clars-train"]
    for expected in ("clars_tf/clars.py", "clars_tf/models/resnet.py",
                     "clars_tf/trainers/train.py",
                     "clars_tf/configs/fashion_mnist_resnet8_clars.yaml",
                     "clars_tf/configs/imagenet/resnet50_32k_clars.yaml"):
        assert expected in names


def test_installed_package_imports_from_outside_the_checkout(installed):
    python, _, outside, env = installed
    code = ("import clars_tf, clars_tf.models, clars_tf.trainers.train; "
            "print(clars_tf.__file__); print(clars_tf.__version__); "
            "print(clars_tf.models.build_model('resnet8', (32, 32, 1), 10)"
            ".count_params())")
    lines = _run([python, "-c", code], cwd=outside, env=env).stdout.split()
    assert "site-packages" in lines[0] and not lines[0].startswith(REPO)
    assert lines[2].isdigit()


def test_console_command_help_lists_the_trainers_flags_and_exits_0(
        installed):
    _, clars_train, outside, env = installed
    env = {key: value for key, value in env.items()
           if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([clars_train, "--help"], cwd=outside, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    flags_listed = re.findall(r"^  (--\w+)", result.stdout, re.M)
    assert flags_listed == [
        "--config_file", "--cpu_devices", "--data_dir", "--export_dir",
        "--mode", "--model_dir", "--params_override", "--strategy", "--tpu",
        "--verbosity", "--helpfull"], result.stdout
    # Neither TensorFlow's start-up lines nor absl's own flags.
    assert result.stderr == ""
    assert "--test_srcdir" not in result.stdout


def test_console_command_trains_two_steps_with_a_bundled_config(installed):
    _, clars_train, outside, env = installed
    model_dir = os.path.join(outside, "run")
    env = {key: value for key, value in env.items()
           if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = _run([clars_train, "--config_file=fashion_mnist_resnet8_clars",
                f"--model_dir={model_dir}", "--mode=train",
                "--params_override=task.dataset=synthetic,train.max_steps=2,"
                "train.global_batch_size=32,estimator.num_micro_batches=2,"
                "train.steps_per_loop=1"], cwd=outside, env=env)
    out = result.stdout
    assert not re.search(r"^(I\d{4} |INFO|WARNING: All log)", result.stderr,
                         re.M), result.stderr[:3000]
    assert json.loads(out[out.index("{\n"):])["model_dir"] == model_dir
    with open(os.path.join(model_dir, "checkpoints", "checkpoint")) as f:
        assert 'model_checkpoint_path: "ckpt-2"' in f.read()


def test_unknown_config_name_lists_the_bundled_ones(installed):
    _, clars_train, outside, env = installed
    result = subprocess.run(
        [clars_train, "--config_file=imagenet/resnet50_32k_clar",
         f"--model_dir={os.path.join(outside, 'bad')}"], cwd=outside,
        env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "Did you mean 'imagenet/resnet50_32k_clars'?" in result.stderr
    assert "Traceback" not in result.stderr
