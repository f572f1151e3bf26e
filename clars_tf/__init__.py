"""clars-tf: CLARS and LARS for Keras 3 (TensorFlow, JAX, PyTorch), correct
under tf.distribute and JAX data parallelism."""

from clars_tf import schedules
from clars_tf.attach import attach_gradient_norm_estimator
from clars_tf.clars import CLARS
from clars_tf.estimators import estimator_from_config
from clars_tf.gradient_norms import GradientNormEstimator
from clars_tf.gradient_norms import NormEstimator
from clars_tf.lars import LARS
from clars_tf.layerwise import trust_ratio
from clars_tf.one_pass_norms import OnePassGradientNormEstimator
from clars_tf.training import StepGradients
from clars_tf.training import apply_state_updates
from clars_tf.training import compute_loss_gradients_and_norms
from clars_tf.training import per_example_loss_of
from clars_tf.vmap_norms import VmapGradientNormEstimator

__all__ = [
    "CLARS",
    "GradientNormEstimator",
    "LARS",
    "NormEstimator",
    "OnePassGradientNormEstimator",
    "StepGradients",
    "VmapGradientNormEstimator",
    "apply_state_updates",
    "attach_gradient_norm_estimator",
    "compute_loss_gradients_and_norms",
    "estimator_from_config",
    "per_example_loss_of",
    "schedules",
    "trust_ratio",
]

__version__ = "0.2.0"
