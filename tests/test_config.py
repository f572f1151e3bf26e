"""Config files by path or by bundled name."""

import os
import re

import pytest
import yaml

from clars_tf.trainers import config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", ["imagenet/resnet50_32k_clars",
                                  "imagenet/resnet50_32k_clars.yaml",
                                  "configs/imagenet/resnet50_32k_clars.yaml"])
def test_bundled_config_by_name_equals_the_file(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    by_path = config.build_config(
        os.path.join(REPO, "configs", "imagenet", "resnet50_32k_clars.yaml"))
    assert config.build_config(name) == by_path
    assert by_path["train"]["global_batch_size"] == 32768


def test_a_users_file_wins_over_a_bundled_config_of_the_same_name(
        tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with open("fashion_mnist_resnet8_clars", "w") as f:
        f.write("train:\n  epochs: 7\n")
    assert config.build_config("fashion_mnist_resnet8_clars")[
        "train"]["epochs"] == 7


def test_bundled_names_are_every_yaml_under_configs_but_the_study_plans():
    on_disk = {os.path.relpath(os.path.join(folder, f), os.path.join(
        REPO, "configs"))[:-len(".yaml")]
        for folder, _, files in os.walk(os.path.join(REPO, "configs"))
        for f in files if f.endswith(".yaml")}
    plans = {"estimator_study/plan", "fourth_study/plan", "gate_study/plan",
             "warmup_study/plan"}
    assert plans <= on_disk
    assert set(config.bundled_config_names()) == on_disk - plans
    assert "imagenet/densenet121_8k_lars_warmup" in on_disk


@pytest.mark.parametrize("config_file, expected", [
    ("gate_study/plan",
     ["'gate_study/plan' is a study plan, not a trainer config",
      "the study's are gate_study/clars, gate_study/lars, gate_study/sgd."]),
    ("fourth_study/plan",
     ["'fourth_study/plan' is a study plan",
      "Pass a trainer config: one of cifar10_resnet20_clars, "]),
    (os.path.join(REPO, "configs", "fourth_study", "plan.yaml"),
     ["has none of the trainer's sections (clars, estimator,",
      "its keys are ", "title", "read by the study's driver in experiments/"]),
    ("fashion_mnist_resnet8_clar",
     ["Did you mean 'fashion_mnist_resnet8_clars'?",
      "imagenet/mobilenet_v2_8k_sgd_warmup"]),
])
def test_a_file_that_is_no_trainer_config_is_refused_saying_what_to_pass(
        config_file, expected):
    with pytest.raises(config.ConfigError) as error:
        config.build_config(config_file)
    for part in expected:
        assert part in str(error.value)


def test_a_file_of_misspelt_sections_suggests_the_section(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("trian:\n  epochs: 3\n")
    with pytest.raises(config.ConfigError, match="its keys are trian. Did "
                       "you mean 'train'?"):
        config.build_config(str(path))


def _flatten(mapping, prefix=""):
    for key, value in mapping.items():
        if isinstance(value, dict) and value and key != "options":
            yield from _flatten(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def test_config_reference_lists_every_key_with_its_type_and_default():
    with open(os.path.join(REPO, "docs", "configs.md"), encoding="utf-8") as f:
        rows = re.findall(r"^\| `([a-z_.]+)` \| (\w+) \| `([^`]*)` \|", f.read(),
                          re.M)
    documented = {key: (kind, yaml.safe_load(default))
                  for key, kind, default in rows}
    defaults = dict(_flatten(config.DEFAULTS))
    assert len(rows) == len(documented), "a key is listed twice"
    assert set(documented) == set(defaults)
    for key, value in defaults.items():
        kind, default = documented[key]
        assert kind == type(value).__name__, key
        assert default == value, key


@pytest.mark.parametrize("jit_compile", [False, True])
def test_one_pass_estimator_is_told_whether_the_step_uses_xla(jit_compile):
    # The trainer compiles its step with XLA exactly when train.jit_compile
    # is set; the estimator picks its convolution path by it.
    built = config.build_config(
        os.path.join(REPO, "configs", "fashion_mnist_resnet8_clars.yaml"),
        "estimator.method=one_pass,"
        f"train.jit_compile={str(jit_compile).lower()}")
    estimator = config.check_against_strategy(built, num_replicas=1)
    assert estimator.jit_compile is jit_compile


def test_the_one_pass_check_is_set_from_the_estimator_section():
    path = os.path.join(REPO, "configs", "fashion_mnist_resnet8_clars.yaml")
    for given, expected in (("", 100), (",estimator.check_every=7", 7),
                            (",estimator.check_every=0", None)):
        built = config.build_config(path, "estimator.method=one_pass" + given)
        estimator = config.check_against_strategy(built, num_replicas=1)
        assert estimator.check_every == expected
    with pytest.raises(config.ConfigError,
                       match=r"'estimator.check_every': must be >= 0 "
                             r"\(0 never checks\)"):
        config.build_config(path, "estimator.check_every=-1")
