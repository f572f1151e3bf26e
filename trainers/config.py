"""Experiment configs: defaults, YAML files, overrides and validation.

A config is a nested dict of plain values (big_vision style). `DEFAULTS`
lists every key a config may set, with its type; a YAML file under
`configs/` and then `--params_override` are merged on top of it. Unknown
keys, wrong types and impossible combinations are rejected before any work
starts, with the key and a fix in the message.
"""

import copy
import difflib
import os

import yaml

from clars_tf.models import MODEL_NAMES
from clars_tf.models import WITHOUT_BATCH_NORM
from clars_tf.models import min_input_size
from clars_tf.models import model_options

OPTIMIZERS = ("clars", "lars", "sgd", "lamb")
# float64: for numerics checks (rounding vs a bug), e.g.
# scripts/replica_agreement.py --precision=float64.
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16", "float64")
DECAYS = ("polynomial", "cosine", "constant")
ESTIMATOR_METHODS = ("loop", "one_pass")

DEFAULTS = {
    "task": {
        "dataset": "fashion_mnist",
        "image_size": 32,
        # Training examples held out as a validation split (the same ones for
        # every run: `trainers.data.validation_indices`); training uses the
        # rest. 0: none.
        "validation_examples": 0,
    },
    "model": {
        "name": "resnet20",
        "use_sync_bn": False,
        # Model-specific options (`models.model_options(name)`), e.g.
        # zero_init_residual, dropout_rate, alpha.
        "options": {},
    },
    "train": {
        "global_batch_size": 512,
        "epochs": 10,
        "max_steps": 0,
        "steps_per_loop": 10,
        "checkpoint_every_steps": 100,
        "checkpoints_to_keep": 3,
        "eval_every_epochs": 1,
        "eval_batch_size": 1000,
        # What each evaluation measures: 'test' (the data set's evaluation
        # split; ImageNet's 'validation'), 'validation' (the held-out
        # task.validation_examples), or both as 'validation+test'.
        "eval_splits": "test",
        # >0: before each evaluation, batch-norm moving statistics are
        # recomputed as the exact average over this many training examples
        # (then put back, so training and checkpoints are unaffected).
        "recompute_bn_examples": 0,
        "label_smoothing": 0.0,
        "precision": "float32",
        "seed": 0,
        "deterministic": False,
        # XLA for the train and eval steps on GPU and CPU (TPUs always
        # compile).
        "jit_compile": False,
        "diagnostics_every_steps": 0,
        # A non-finite gradient or estimate: 'stop' (the default) or 'skip'
        # the step. float16 loss scaling always skips, as Keras does.
        "on_nonfinite": "stop",
    },
    "optimizer": {
        "name": "clars",
        "base_learning_rate": 0.1,
        "reference_batch_size": 128,
        "momentum": 0.9,
        "nesterov": False,
        "weight_decay_rate": 0.0002,
        "exclude_from_layer_adaptation": [],
        "warmup_epochs": 0.0,
        "decay": "polynomial",
        "end_learning_rate": 0.0001,
        "power": 2.0,
    },
    # Used when optimizer.name is clars (defaults: the reference code).
    "clars": {
        "trust_coefficient": 0.01,
        "trust_clip": 0.1,
        "epsilon": 1e-6,
        "decay_excluded_variables": True,
        # False: biases and batch-norm variables get trust ratios too.
        "exclude_rank_one_variables": True,
    },
    # Used when optimizer.name is lars (defaults: MLPerf).
    "lars": {
        "trust_coefficient": 0.001,
        "epsilon": 0.0,
        "decay_excluded_variables": False,
        # .inf: no clip (MLPerf); CLARS's 0.1 with its eta 0.01 leaves
        # LARS differing from CLARS only in the trust's denominator.
        "trust_clip": float("inf"),
    },
    "estimator": {
        # 'loop' (the reference: J extra passes over micro-batches) or
        # 'one_pass' (norms read off the main step's own pass where they
        # equal the loop's; batch norm and dropout send every variable to
        # the loop: see clars_tf/one_pass_plan.py).
        "method": "loop",
        "micro_batch_size": 8,
        "num_micro_batches": 64,
        "refresh_every": 1,
        # 'one_pass' only: check on the first step and every this many
        # that each variable read off the pass has the gradient its norms
        # are read from (0: never; see OnePassGradientNormEstimator).
        "check_every": 100,
    },
}


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the fix."""


def _closest(name, candidates):
    match = difflib.get_close_matches(name, list(candidates), n=1)
    return f" Did you mean '{match[0]}'?" if match else ""


def _merge(base, override, prefix=""):
    for key, value in override.items():
        path = f"{prefix}{key}"
        if key not in base:
            raise ConfigError(
                f"Unknown config key '{path}'.{_closest(key, base)} Valid keys "
                f"here: {', '.join(sorted(base))}.")
        default = base[key]
        if isinstance(default, dict) and not default and isinstance(value,
                                                                    dict):
            base[key] = dict(value)  # free-form mapping, checked by its user
        elif isinstance(default, dict):
            if not isinstance(value, dict):
                raise ConfigError(
                    f"Config key '{path}' is a section; give it a mapping of "
                    f"keys ({', '.join(sorted(default))}), not {value!r}.")
            _merge(default, value, prefix=f"{path}.")
        else:
            base[key] = _coerce(path, default, value)


def _coerce(path, default, value):
    """Checks `value` against the default's type (ints widen to floats)."""
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):
            # YAML 1.1 reads exponents without a dot (1e-4) as strings.
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
    else:
        ok = isinstance(value, str)
    if not ok:
        kind = type(default).__name__
        raise ConfigError(
            f"Config key '{path}' must be a {kind}"
            f"{' of strings' if kind == 'list' else ''}, got {value!r} "
            f"({type(value).__name__}).")
    return value


def parse_overrides(text):
    """Parses `--params_override`: a YAML mapping or `a.b=1,c.d=x` pairs.

    Args:
        text: the flag's value.

    Returns:
        A nested dict.
    """
    text = (text or "").strip()
    if not text:
        return {}
    if "=" in text and not text.lstrip().startswith("{"):
        nested = {}
        for item in text.split(","):
            if "=" not in item:
                raise ConfigError(
                    f"--params_override: '{item}' is not key=value; write e.g. "
                    "'train.epochs=5,optimizer.name=lars'.")
            key, raw = item.split("=", 1)
            try:
                value = yaml.safe_load(raw) if raw.strip() else ""
            except yaml.YAMLError as error:
                raise ConfigError(
                    f"--params_override: cannot parse the value of '{key}': "
                    f"{error}") from None
            node = nested
            parts = key.strip().split(".")
            for part in parts[:-1]:
                node = node.setdefault(part, {})
            node[parts[-1]] = value
        return nested
    try:
        nested = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"--params_override is neither key=value pairs nor valid YAML: "
            f"{error}") from None
    if not isinstance(nested, dict):
        raise ConfigError(
            "--params_override must be a YAML mapping or key=value pairs, got "
            f"{text!r}.")
    return nested


BUNDLED_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _is_trainer_config(path):
    """Whether a bundled YAML file is a trainer config: a mapping of config
    sections (task, model, train, ...). Study plans kept beside a study's
    configs (gate_study/plan.yaml, ...) are read by experiments/, not by
    the trainer."""
    with open(path, encoding="utf-8") as f:
        content = yaml.safe_load(f)
    return isinstance(content, dict) and set(content) <= set(DEFAULTS)


def _bundled_yaml_names():
    names = []
    for folder, _, files in os.walk(BUNDLED_CONFIGS):
        relative = os.path.relpath(folder, BUNDLED_CONFIGS)
        names += [os.path.normpath(os.path.join(relative, f[:-len(".yaml")]))
                  for f in files if f.endswith(".yaml")]
    return sorted(names)


def bundled_config_names():
    """Names of the configs shipped with clars-tf, e.g. 'imagenet/resnet50_32k_clars'."""
    return [name for name in _bundled_yaml_names() if _is_trainer_config(
        os.path.join(BUNDLED_CONFIGS, name + ".yaml"))]


def resolve_config_file(name_or_path):
    """A config file by path, or a bundled config by name (with or without .yaml).

    A path that exists wins, so a user's own `configs/x.yaml` is never
    shadowed by a bundled config of the same name.
    """
    if os.path.isfile(name_or_path):
        return name_or_path
    name = name_or_path[:-len(".yaml")] if name_or_path.endswith(
        ".yaml") else name_or_path
    if name.startswith("configs/"):
        name = name[len("configs/"):]
    bundled = os.path.join(BUNDLED_CONFIGS, name + ".yaml")
    names = bundled_config_names()
    if name in names:
        return bundled
    if os.path.isfile(bundled):
        raise ConfigError(
            f"'{name_or_path}' is a study plan, not a trainer config: the "
            f"study's driver in experiments/ reads it (see "
            f"experiments/README.md). Pass a trainer config: "
            f"{_configs_beside(name, names)}.")
    hint = _closest(name, names)
    raise ConfigError(
        f"Config file '{name_or_path}' does not exist, and no bundled config "
        f"has that name.{hint} Pass a path to a YAML file or one of the "
        f"bundled names: {', '.join(names)}.")


def _configs_beside(name, names):
    folder = os.path.dirname(name)
    beside = [n for n in names if os.path.dirname(n) == folder]
    if beside:
        return "the study's are " + ", ".join(beside)
    return "one of " + ", ".join(names)


def load_yaml(path):
    """Reads a config file, rejecting malformed YAML with its location."""
    try:
        with open(resolve_config_file(path), encoding="utf-8") as f:
            content = yaml.safe_load(f)
    except yaml.YAMLError as error:
        raise ConfigError(f"Config file '{path}' is not valid YAML: {error}"
                          ) from None
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise ConfigError(
            f"Config file '{path}' must hold a mapping of sections (task, "
            f"model, train, ...), got {type(content).__name__}.")
    if content and not set(content) & set(DEFAULTS):
        raise ConfigError(
            f"Config file '{path}' has none of the trainer's sections "
            f"({', '.join(sorted(DEFAULTS))}); its keys are "
            f"{', '.join(sorted(map(str, content)))}."
            f"{_closest(str(next(iter(content))), DEFAULTS)} A study plan "
            "(configs/*_study/plan.yaml) is read by the study's driver in "
            "experiments/ (see experiments/README.md), not by the trainer.")
    return content


def build_config(config_file=None, params_override=None):
    """Defaults, then the YAML file, then the overrides; validated."""
    config = copy.deepcopy(DEFAULTS)
    if config_file:
        _merge(config, load_yaml(config_file))
    _merge(config, parse_overrides(params_override))
    validate(config)
    return config


def _require(condition, key, message):
    if not condition:
        raise ConfigError(f"Config key '{key}': {message}")


def validate(config):
    """Checks values and combinations that do not depend on the machine."""
    task, model, train = config["task"], config["model"], config["train"]
    opt, est = config["optimizer"], config["estimator"]
    from clars_tf.trainers import data  # deferred: data imports tensorflow_datasets
    _require(task["dataset"] in data.DATASETS, "task.dataset",
             f"unknown data set '{task['dataset']}'."
             f"{_closest(task['dataset'], data.DATASETS)} Choose one of "
             f"{', '.join(sorted(data.DATASETS))}.")
    dataset = data.DATASETS[task["dataset"]]
    _require(train["global_batch_size"] <= dataset.num_train_examples,
             "train.global_batch_size",
             f"{train['global_batch_size']} is larger than the "
             f"{dataset.num_train_examples} training examples of "
             f"{task['dataset']}.")
    validation = task["validation_examples"]
    _require(0 <= validation < dataset.num_train_examples,
             "task.validation_examples",
             f"must be in [0, {dataset.num_train_examples}) for "
             f"{task['dataset']}, got {validation}; e.g. 5000.")
    trained = dataset.num_train_examples - validation
    _require(train["global_batch_size"] <= trained, "train.global_batch_size",
             f"{train['global_batch_size']} is larger than the {trained} "
             f"examples left for training after holding out {validation}; "
             "lower it or task.validation_examples.")
    splits = train["eval_splits"].split("+")
    _require(set(splits) <= {"test", "validation"}
             and len(set(splits)) == len(splits), "train.eval_splits",
             f"must be 'test', 'validation' or 'validation+test', got "
             f"'{train['eval_splits']}'.")
    _require("validation" not in splits or validation > 0,
             "train.eval_splits",
             "'validation' needs held-out examples; set "
             "task.validation_examples (e.g. 5000).")
    bn_examples = train["recompute_bn_examples"]
    _require(0 <= bn_examples <= trained, "train.recompute_bn_examples",
             f"must be in [0, {trained}] (the training examples), got "
             f"{bn_examples}.")
    bn_batch = min(bn_examples, train["global_batch_size"])
    _require(not bn_examples or bn_examples % bn_batch == 0,
             "train.recompute_bn_examples",
             f"{bn_examples} is not a whole number of training batches of "
             f"{train['global_batch_size']}; use a multiple of it or a "
             "number no larger than it.")
    _require(model["name"] in MODEL_NAMES, "model.name",
             f"unknown model '{model['name']}'."
             f"{_closest(model['name'], MODEL_NAMES)} Choose one of "
             f"{', '.join(MODEL_NAMES)}.")
    smallest = min_input_size(model["name"])
    _require(task["image_size"] >= smallest, "task.image_size",
             f"must be >= {smallest} (the smallest input of "
             f"{model['name']}).")
    valid_options = model_options(model["name"])
    for option in model["options"]:
        _require(option in valid_options and option != "use_sync_bn",
                 f"model.options.{option}",
                 f"not an option of {model['name']}."
                 f"{_closest(option, valid_options)} Valid: "
                 f"{', '.join(o for o in valid_options if o != 'use_sync_bn')}"
                 ".")
    _require(opt["name"] in OPTIMIZERS, "optimizer.name",
             f"unknown optimizer '{opt['name']}'."
             f"{_closest(opt['name'], OPTIMIZERS)} Choose one of "
             f"{', '.join(OPTIMIZERS)}.")
    _require(train["precision"] in PRECISIONS, "train.precision",
             f"must be one of {', '.join(PRECISIONS)}.")
    _require(opt["decay"] in DECAYS, "optimizer.decay",
             f"must be one of {', '.join(DECAYS)}.")
    for key in ("global_batch_size", "epochs", "steps_per_loop",
                "checkpoint_every_steps", "eval_every_epochs",
                "eval_batch_size", "checkpoints_to_keep"):
        _require(train[key] >= 1, f"train.{key}", "must be >= 1.")
    _require(train["on_nonfinite"] in ("stop", "skip"), "train.on_nonfinite",
             "must be 'stop' or 'skip'.")
    _require(train["max_steps"] >= 0, "train.max_steps",
             "must be >= 0 (0 means the whole run).")
    _require(0.0 <= train["label_smoothing"] < 1.0, "train.label_smoothing",
             "must be in [0, 1).")
    _require(opt["base_learning_rate"] > 0, "optimizer.base_learning_rate",
             "must be > 0.")
    _require(0.0 <= opt["momentum"] < 1.0, "optimizer.momentum",
             "must be in [0, 1).")
    _require(opt["warmup_epochs"] >= 0, "optimizer.warmup_epochs",
             "must be >= 0.")
    _require(config["lars"]["trust_clip"] > 0, "lars.trust_clip",
             "must be > 0 (.inf for no clip, MLPerf's LARS).")
    _require(opt["warmup_epochs"] < train["epochs"], "optimizer.warmup_epochs",
             f"must be shorter than train.epochs ({train['epochs']}).")
    for key in ("micro_batch_size", "num_micro_batches", "refresh_every"):
        _require(est[key] >= 1, f"estimator.{key}", "must be >= 1.")
    _require(est["check_every"] >= 0, "estimator.check_every",
             "must be >= 0 (0 never checks).")
    _require(est["micro_batch_size"] >= 2
             or model["name"] in WITHOUT_BATCH_NORM,
             "estimator.micro_batch_size",
             f"must be >= 2 for {model['name']}: it uses batch "
             "normalization, and one example normalized by its own "
             "statistics has almost no gradient, so the estimate would "
             "collapse (the reference uses 8; 1 is allowed for "
             f"{', '.join(WITHOUT_BATCH_NORM)}).")
    _require(est["method"] in ESTIMATOR_METHODS, "estimator.method",
             f"unknown method '{est['method']}'. Choose one of "
             f"{', '.join(ESTIMATOR_METHODS)}.")
    return config


def check_against_strategy(config, num_replicas):
    """Checks what depends on the number of replicas."""
    train, est = config["train"], config["estimator"]
    batch = train["global_batch_size"]
    _require(batch % num_replicas == 0, "train.global_batch_size",
             f"{batch} is not divisible by the {num_replicas} replicas; use a "
             f"multiple of {num_replicas}.")
    bn_batch = min(train["recompute_bn_examples"], batch)
    _require(bn_batch % num_replicas == 0, "train.recompute_bn_examples",
             f"its batches of {bn_batch} are not divisible by the "
             f"{num_replicas} replicas; use a multiple of {num_replicas}.")
    if config["optimizer"]["name"] == "clars":
        import clars_tf
        estimator = clars_tf.estimator_from_config(
            est, jit_compile=train["jit_compile"])
        try:
            estimator.check_fits(batch // num_replicas, num_replicas)
        except ValueError as error:
            raise ConfigError(f"Config section 'estimator': {error}") from None
        return estimator
    return None
