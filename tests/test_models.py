"""Tests for `models`: shapes, training, hand-derived parameter counts, options."""

import functools

import keras
import numpy as np
import pytest
import tensorflow as tf

from clars_tf import models

IMAGENET_SHAPE = (224, 224, 3)
CIFAR_SHAPE = (32, 32, 3)
FASHION_SHAPE = (28, 28, 1)
# The models with batch norm share the tests parametrized over these
# (stems, dropout, batch-norm options); those without have their own below.
BATCH_NORM_MODELS = [n for n in models.MODEL_NAMES
                     if n not in models.WITHOUT_BATCH_NORM]


@functools.cache
def _imagenet_model(name):
    # Building and training at 224 is the slow part; do it once per model.
    return models.build_model(name, IMAGENET_SHAPE, 1000)


def _count(variables):
    return sum(int(np.prod(v.shape)) for v in variables)


def _train_step(model, num_classes):
    """Runs one SGD step on a random batch of 2 and returns the loss."""
    rng = np.random.default_rng(0)
    images = rng.standard_normal((2, *model.input_shape[1:])).astype("float32")
    labels = np.array([0, num_classes - 1])
    optimizer = keras.optimizers.SGD(learning_rate=0.1)
    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_mean(
            keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True)
        )
    grads = tape.gradient(loss, model.trainable_variables)
    assert all(g is not None for g in grads), "some weights are not connected to the loss"
    optimizer.apply_gradients(zip(grads, model.trainable_variables))
    assert logits.shape == (2, num_classes)
    assert logits.dtype == tf.float32
    return float(loss)


def _assert_trains(model, num_classes):
    # With zero_init_residual the convs inside residual branches get no
    # gradient on the first step, but the stem (reached through the identity
    # shortcuts) and the classifier always do.
    stem = model.get_layer("conv1_conv").kernel
    classifier = model.get_layer("logits").kernel
    before = [stem.numpy(), classifier.numpy()]
    loss = _train_step(model, num_classes)
    assert np.isfinite(loss)
    for old, variable in zip(before, [stem, classifier]):
        assert not np.allclose(old, variable.numpy()), f"{variable.path} did not change"
    for variable in model.weights:
        assert np.all(np.isfinite(variable.numpy())), f"{variable.path} is not finite"


def _batch_norms(model):
    return [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]


@pytest.mark.parametrize("name", BATCH_NORM_MODELS)
def test_builds_and_trains_at_32(name):
    model = models.build_model(name, CIFAR_SHAPE, 10)
    assert model.output_shape == (None, 10)
    # Defaults documented by build_model.
    for layer in _batch_norms(model):
        assert (layer.synchronized, layer.momentum, layer.epsilon) == (False, 0.9, 1e-5)
    assert not any(isinstance(l, keras.layers.Dropout) for l in model.layers)
    _assert_trains(model, 10)


@pytest.mark.parametrize("name", BATCH_NORM_MODELS)
def test_builds_and_trains_at_224(name):
    model = _imagenet_model(name)
    assert model.output_shape == (None, 1000)
    _assert_trains(model, 1000)


@pytest.mark.parametrize("name", BATCH_NORM_MODELS)
def test_options_and_deterministic_names(name):
    options = dict(use_sync_bn=True, bn_momentum=0.99, bn_epsilon=1e-3, dropout_rate=0.25)
    first = models.build_model(name, CIFAR_SHAPE, 10, **options)
    second = models.build_model(name, CIFAR_SHAPE, 10, **options)
    paths = [v.path for v in first.weights]
    assert paths == [v.path for v in second.weights]
    assert len(set(paths)) == len(paths)
    assert _batch_norms(first)
    for layer in _batch_norms(first):
        assert (layer.synchronized, layer.momentum, layer.epsilon) == (True, 0.99, 1e-3)
    # Dropout sits right before the classifier.
    assert isinstance(first.layers[-2], keras.layers.Dropout)
    assert first.layers[-2].rate == 0.25
    # Synchronised BN must also train outside a distribution strategy.
    _assert_trains(first, 10)


@pytest.mark.parametrize("name", BATCH_NORM_MODELS)
def test_odd_size_one_channel_input(name):
    # Fashion-MNIST-like single channel, non-square, odd sizes.
    model = models.build_model(name, (33, 47, 1), 7)
    assert model.output_shape == (None, 7)
    logits = model(np.zeros((1, 33, 47, 1), "float32"), training=False)
    assert logits.shape == (1, 7)


def test_logits_are_linear_float32_dense():
    model = models.build_model("resnet8", CIFAR_SHAPE, 10)
    head = model.layers[-1]
    assert isinstance(head, keras.layers.Dense)
    assert head.activation is keras.activations.linear
    assert head.dtype_policy.name == "float32"


def test_mixed_precision_outputs_float32_logits():
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_float16")
    try:
        model = models.build_model("resnet8", CIFAR_SHAPE, 10)
    finally:
        keras.config.set_dtype_policy(previous)
    assert model.get_layer("conv1_conv").compute_dtype == "float16"
    assert model.outputs[0].dtype == "float32"


def _cifar_resnet_trainable_params(n, num_classes=10):
    """Trainable parameters of ResNet-(6n+2), derived by hand.

    Convs are 3x3 without bias; each BN has gamma and beta per channel.
    Stage 1 has 2n convs 16->16. Stages 2 and 3 open with one conv that
    doubles the channels (16->32, 32->64), followed by 2n-1 convs at the new
    width, and have a 1x1 projection conv + BN on their first shortcut.
    """
    stem = 3 * 3 * 3 * 16 + 2 * 16
    convs = (
        2 * n * 9 * 16 * 16
        + 9 * 16 * 32 + (2 * n - 1) * 9 * 32 * 32
        + 9 * 32 * 64 + (2 * n - 1) * 9 * 64 * 64
    )
    block_bns = 2 * n * 2 * (16 + 32 + 64)
    projections = (16 * 32 + 2 * 32) + (32 * 64 + 2 * 64)
    classifier = 64 * num_classes + num_classes
    return stem + convs + block_bns + projections + classifier


def test_cifar_resnet_parameter_counts():
    # ResNet-20 with zero-padding (option A) shortcuts is the well known
    # 269,722-parameter / "0.27M" network; our 1x1 conv + BN projections add
    # 16*32 + 2*32 + 32*64 + 2*64 = 2,752.
    assert _cifar_resnet_trainable_params(3) == 269_722 + 2_752 == 272_474
    # Likewise ResNet-56 with option A has 853,018 parameters.
    assert _cifar_resnet_trainable_params(9) == 853_018 + 2_752 == 855_770
    for name, n in (("resnet8", 1), ("resnet20", 3), ("resnet56", 9)):
        model = models.build_model(name, CIFAR_SHAPE, 10)
        assert _count(model.trainable_weights) == _cifar_resnet_trainable_params(n)
        # Moving mean and variance of every BN channel: stem 16, 2n BNs per
        # stage, plus the two projection BNs (32 and 64 channels).
        bn_channels = 16 + 2 * n * (16 + 32 + 64) + 32 + 64
        assert _count(model.non_trainable_weights) == 2 * bn_channels


def test_resnet50_parameter_count():
    # torchvision's ResNet-50 has 25,557,032 trainable parameters (convs
    # without bias, BN gamma/beta, 2048x1000 fc). Keras' ResNet50 reports
    # 25,636,712 because its convs have biases (one per output channel of
    # the 53 convs: 26,560) and it counts the BN moving mean and variance
    # (2 * 26,560 = 53,120, since every conv is followed by one BN):
    #   25,636,712 - 26,560 (biases) - 53,120 (moving stats) = 25,557,032.
    # Ours has no conv biases, so it has 25,557,032 trainable parameters and
    # 25,610,152 in total including the moving statistics. The v1.5 stride
    # placement does not change the count.
    def bottleneck(in_channels, width):
        out = 4 * width
        return in_channels * width + 9 * width * width + width * out + 2 * (2 * width + out)

    def stage(in_channels, width, blocks):
        projection = in_channels * 4 * width + 2 * 4 * width
        return projection + bottleneck(in_channels, width) + (blocks - 1) * bottleneck(
            4 * width, width
        )

    trainable = (
        7 * 7 * 3 * 64 + 2 * 64
        + stage(64, 64, 3)
        + stage(256, 128, 4)
        + stage(512, 256, 6)
        + stage(1024, 512, 3)
        + 2048 * 1000 + 1000
    )
    assert trainable == 25_557_032
    model = _imagenet_model("resnet50")
    assert _count(model.trainable_weights) == 25_557_032
    assert _count(model.non_trainable_weights) == 53_120
    assert model.count_params() == 25_610_152


@pytest.mark.parametrize(
    "name, trainable, moving_stats",
    [
        # Published counts of the reference implementations, which also use
        # bias-free convs: torchvision reports the trainable part, Keras
        # applications (weights=None) the total of 8,062,504 / 4,253,864 /
        # 3,538,984. Keras' MobileNet v1 classifier is a 1x1 conv with bias,
        # which has exactly the parameters of our Dense layer.
        ("densenet121", 7_978_856, 83_648),
        ("mobilenet_v1", 4_231_976, 21_888),
        ("mobilenet_v2", 3_504_872, 34_112),
    ],
)
def test_imagenet_parameter_counts(name, trainable, moving_stats):
    model = _imagenet_model(name)
    assert _count(model.trainable_weights) == trainable
    assert _count(model.non_trainable_weights) == moving_stats


def test_mobilenet_alpha_scales_widths():
    v1 = models.build_model("mobilenet_v1", CIFAR_SHAPE, 10, alpha=0.5)
    assert v1.get_layer("conv1_conv").filters == 16
    assert v1.get_layer("block13_pointwise_conv").filters == 512
    v2 = models.build_model("mobilenet_v2", CIFAR_SHAPE, 10, alpha=0.5)
    assert v2.get_layer("conv1_conv").filters == 16
    assert v2.get_layer("block17_project_conv").filters == 160
    # The last conv keeps 1280 channels for alpha <= 1, as in the paper.
    assert v2.get_layer("conv_last_conv").filters == 1280


def test_resnet50_strides_on_3x3_conv():
    model = _imagenet_model("resnet50")
    for stage in (3, 4, 5):
        assert model.get_layer(f"conv{stage}_block1_1_conv").strides == (1, 1)
        assert model.get_layer(f"conv{stage}_block1_2_conv").strides == (2, 2)
        assert model.get_layer(f"conv{stage}_block1_0_conv").strides == (2, 2)


@pytest.mark.parametrize("name", ["resnet50", "densenet121", "mobilenet_v1", "mobilenet_v2"])
def test_small_input_stem(name):
    small = models.build_model(name, (64, 64, 3), 10)
    large = _imagenet_model(name)
    small_stem, large_stem = small.get_layer("conv1_conv"), large.get_layer("conv1_conv")
    assert small_stem.strides == (1, 1)
    assert large_stem.strides == (2, 2)
    has_max_pool = name in ("resnet50", "densenet121")
    if has_max_pool:
        assert small_stem.kernel_size == (3, 3)
        assert large_stem.kernel_size == (7, 7)
    assert not any(isinstance(l, keras.layers.MaxPooling2D) for l in small.layers)
    assert any(isinstance(l, keras.layers.MaxPooling2D) for l in large.layers) == has_max_pool
    # 64 px is still "small"; 65 px is not.
    bigger = models.build_model(name, (65, 65, 3), 10)
    assert bigger.get_layer("conv1_conv").strides == (2, 2)


@pytest.mark.parametrize(
    "name, num_blocks, last_bn",
    [("resnet20", 9, "_2_bn"), ("resnet50", 16, "_3_bn")],
)
def test_zero_init_residual(name, num_blocks, last_bn):
    model = models.build_model(name, CIFAR_SHAPE, 10)
    blocks = [l.name[: -len("_add")] for l in model.layers if isinstance(l, keras.layers.Add)]
    assert len(blocks) == num_blocks
    zero = {l.name for l in _batch_norms(model) if not np.any(l.gamma.numpy())}
    assert zero == {block + last_bn for block in blocks}
    for layer in _batch_norms(model):
        if layer.name not in zero:
            np.testing.assert_array_equal(layer.gamma.numpy(), 1.0)

    plain = models.build_model(name, CIFAR_SHAPE, 10, zero_init_residual=False)
    for layer in _batch_norms(plain):
        np.testing.assert_array_equal(layer.gamma.numpy(), 1.0)


@pytest.mark.parametrize("bad_name", ["resnet-50", "ResNet50"])
def test_unknown_model_name(bad_name):
    with pytest.raises(ValueError) as error:
        models.build_model(bad_name, CIFAR_SHAPE, 10)
    message = str(error.value)
    assert repr(bad_name) in message
    assert all(name in message for name in models.MODEL_NAMES)
    assert "Did you mean 'resnet50'?" in message


def test_unknown_option():
    with pytest.raises(ValueError, match="'zero_init_residul'"):
        models.build_model("resnet20", CIFAR_SHAPE, 10, zero_init_residul=False)
    # Valid for MobileNets only.
    with pytest.raises(ValueError, match="'alpha'.*'resnet50'"):
        models.build_model("resnet50", CIFAR_SHAPE, 10, alpha=0.5)
    assert "alpha" in models.model_options("mobilenet_v2")
    assert "zero_init_residual" not in models.model_options("densenet121")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(input_shape=(31, 32, 3)), "at least 32"),
        (dict(input_shape=(32, 32)), "input_shape"),
        (dict(num_classes=0), "num_classes"),
        (dict(dropout_rate=1.0), "dropout_rate"),
        (dict(bn_momentum=1.0), "bn_momentum"),
        (dict(bn_epsilon=0.0), "bn_epsilon"),
    ],
)
def test_invalid_arguments(kwargs, match):
    args = dict(input_shape=CIFAR_SHAPE, num_classes=10) | kwargs
    with pytest.raises(ValueError, match=match):
        models.build_model("resnet8", **args)


def test_mobilenet_rejects_non_positive_alpha():
    with pytest.raises(ValueError, match="alpha"):
        models.build_model("mobilenet_v1", CIFAR_SHAPE, 10, alpha=0.0)


def test_small_cnn_parameter_count_and_width():
    model = models.build_model("small_cnn", (32, 32, 1), 10, width=8)
    # conv (k*k*in*out, no bias) + BN (4 per channel) for 8, 16, 32 channels,
    # then a dense layer of 32*10 + 10.
    convs = 9 * (1 * 8 + 8 * 16 + 16 * 32)
    batch_norms = 4 * (8 + 16 + 32)
    assert model.count_params() == convs + batch_norms + 32 * 10 + 10
    assert [l.filters for l in model.layers if isinstance(l, keras.layers.Conv2D)] == [8, 16, 32]
    assert not any(isinstance(l, keras.layers.Add) for l in model.layers)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        models.build_model("small_cnn", (32, 32, 1), 10, width=0)


# Models without batch norm ---------------------------------------------------


@pytest.mark.parametrize("name, params", [
    # 784*200+200 + 3*(200*200+200) + 200*10+10.
    ("sigmoid_mlp", 279_610),
    # 4*4*1*20+20, 2 * (5*5*20*20+20), 3*3*20*20+20, 3*3*20*10+10.
    ("sigmoid_cnn", 25_810),
    # Convs 320, 9,248, 18,496, 36,928, 73,856, 147,584; 28 -> 14 -> 7 -> 4
    # pixels, so the dense layer takes 4*4*128 = 2,048: 524,544; logits 2,570.
    ("plain_cnn", 813_546),
])
def test_no_norm_parameter_counts_and_training(name, params):
    model = models.build_model(name, FASHION_SHAPE, 10)
    assert model.count_params() == params
    assert not _batch_norms(model)
    before = [v.numpy() for v in model.trainable_variables]
    assert np.isfinite(_train_step(model, 10))
    for old, variable in zip(before, model.trainable_variables):
        assert not np.allclose(old, variable.numpy()), variable.path


def test_sigmoid_mlp_matches_numpy_forward_pass():
    model = models.build_model("sigmoid_mlp", FASHION_SHAPE, 10)
    images = np.random.default_rng(1).standard_normal((3, *FASHION_SHAPE))
    x = images.reshape(3, -1)
    weights = [v.numpy().astype("float64") for v in model.trainable_variables]
    for kernel, bias in zip(weights[0:-2:2], weights[1:-2:2]):
        x = 1 / (1 + np.exp(-(x @ kernel + bias)))
    expected = x @ weights[-2] + weights[-1]
    np.testing.assert_allclose(model(images.astype("float32")), expected,
                               rtol=1e-4, atol=1e-4)


def test_sigmoid_mlp_initialisation_is_the_authors():
    keras.utils.set_random_seed(0)
    model = models.build_model("sigmoid_mlp", FASHION_SHAPE, 10)
    kernel = model.get_layer("dense1").kernel.numpy()
    # Kaiming normal, not truncated: std sqrt(2 / 784) = 0.0505, and draws
    # beyond the 2 standard deviations where a truncated normal stops.
    assert abs(kernel.std() / np.sqrt(2 / 784) - 1) < 0.01
    assert np.abs(kernel).max() > 3.5 * np.sqrt(2 / 784)
    biases = np.concatenate([model.get_layer(f"dense{i}").bias.numpy()
                             for i in range(1, 5)])
    assert abs(biases.std() - 1) < 0.1  # N(0, 1), 800 draws
    deeper = models.build_model("sigmoid_mlp", FASHION_SHAPE, 10,
                                hidden_layers=8)
    assert deeper.count_params() == 279_610 + 4 * (200 * 200 + 200)


def test_sigmoid_cnn_reaches_one_pixel_with_default_torch_init():
    model = models.build_model("sigmoid_cnn", FASHION_SHAPE, 10)
    sizes = [model.get_layer(f"conv{i}").output.shape[1] for i in range(1, 6)]
    assert sizes == [13, 9, 5, 3, 1]
    # U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in 4*4*1 = 16 for conv1.
    kernel = model.get_layer("conv1").kernel.numpy()
    assert np.abs(kernel).max() <= 0.25 and np.abs(kernel).max() > 0.2
    with pytest.raises(ValueError, match="task.image_size=28"):
        models.build_model("sigmoid_cnn", (32, 32, 1), 10)


@pytest.mark.parametrize("name", models.WITHOUT_BATCH_NORM)
def test_no_norm_models_refuse_batch_norm_options(name):
    with pytest.raises(ValueError, match="has no batch normalization"):
        models.build_model(name, FASHION_SHAPE, 10, bn_momentum=0.99)
    assert models.min_input_size(name) <= 28


def test_config_allows_28_pixels_and_single_examples_only_without_bn():
    from clars_tf.trainers import config

    settings = ("task.image_size=28,estimator.micro_batch_size=1,"
                "model.name=")
    built = config.build_config(params_override=settings + "sigmoid_mlp")
    assert built["task"]["image_size"] == 28
    with pytest.raises(config.ConfigError, match="must be >= 32"):
        config.build_config(params_override=settings + "small_cnn")
    with pytest.raises(config.ConfigError, match="must be >= 2 for small_cnn"):
        config.build_config(params_override=(
            "estimator.micro_batch_size=1,model.name=small_cnn"))
