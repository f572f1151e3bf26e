"""Independent numpy transcriptions of the spec's update rules.

Written from `clars-spec.md`, not from the library, so tests compare the
library against the spec.
"""

import numpy as np


def _trust(weight_norm, zero_check_norm, denominator, eta):
    if weight_norm > 0 and zero_check_norm > 0:
        return eta * weight_norm / denominator
    return 1.0


def clars_step(weights, buffers, gradients, norms, rate, *, momentum, decay,
               eta, clip, epsilon, adapted, decayed, nesterov=False):
    """One CLARS step: returns the new weights, updates `buffers` in place."""
    new_weights = []
    for i, (w, g, a) in enumerate(zip(weights, gradients, norms)):
        w = np.asarray(w, dtype=np.float64)
        lam = decay if decayed[i] else 0.0
        d = g + lam * w
        if adapted[i]:
            trust = min(clip, _trust(np.linalg.norm(w), a, a + epsilon, eta))
        else:
            trust = 1.0
        buffers[i] = momentum * buffers[i] + d
        step = momentum * buffers[i] + d if nesterov else buffers[i]
        new_weights.append(w - rate * trust * step)
    return new_weights


def clars_steps(weights, gradients, norms, rates, **hyperparameters):
    """Runs CLARS; gradients[t][i], norms[t][i], rates[t]."""
    weights = [np.array(w, dtype=np.float64) for w in weights]
    buffers = [np.zeros_like(w) for w in weights]
    for step_gradients, step_norms, rate in zip(gradients, norms, rates):
        weights = clars_step(weights, buffers, step_gradients, step_norms,
                             rate, **hyperparameters)
    return weights


def lars_step(weights, velocities, gradients, rate, *, momentum, decay, eta,
              epsilon, adapted, nesterov=False):
    """One MLPerf LARS step (excluded variables: trust 1, no decay)."""
    new_weights = []
    for i, (w, g) in enumerate(zip(weights, gradients)):
        w = np.asarray(w, dtype=np.float64)
        if adapted[i]:
            d = g + decay * w
            w_norm, g_norm = np.linalg.norm(w), np.linalg.norm(g)
            trust = _trust(w_norm, g_norm, g_norm + decay * w_norm + epsilon,
                           eta)
        else:
            d, trust = g, 1.0
        scaled = rate * trust * d
        velocities[i] = momentum * velocities[i] + scaled
        step = momentum * velocities[i] + scaled if nesterov else (
            velocities[i])
        new_weights.append(w - step)
    return new_weights


def lars_steps(weights, gradients, rates, **hyperparameters):
    """Runs MLPerf LARS; gradients[t][i], rates[t]."""
    weights = [np.array(w, dtype=np.float64) for w in weights]
    velocities = [np.zeros_like(w) for w in weights]
    for step_gradients, rate in zip(gradients, rates):
        weights = lars_step(weights, velocities, step_gradients, rate,
                            **hyperparameters)
    return weights
