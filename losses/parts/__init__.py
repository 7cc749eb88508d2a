"""Reusable pieces of score-distillation losses (DMD2, SiD, SIM, f-distill), composed by the loss files, not
inherited. Not losses themselves: ``losses._import_all`` skips this package.

* :mod:`.functional` - pure math: the DMD gradient and its injection surrogate, EDM's loss weight, x0 DSM;
* :mod:`.fake_score` - the fake score network (teacher copy / fresh MLP / residual) and its DSM critic loss;
* :mod:`.gan` - the GAN head on a feature tap of the fake score, non-saturating losses, ``no_param_grad``;
* :mod:`.dm_regulariser` - DMD's generator term and a mixin adding it (with its critic) to trajectory losses;
* :mod:`.score_implicit` - SIM's score-divergence gradient of a generator sample (SIM and the regulariser);
* :mod:`.rollout` - one-step generation and multi-step backward simulation, drawn through the batch;
* :mod:`.jvp` - directional derivatives (forward-mode JVP or central difference) and forked dropout RNG;
* :mod:`.sigmas` - training noise-level densities (DMD2's index grid, EDM's log-normal), drawn through the batch,
  and off-marginal points (a share of the batch noised wider) for losses whose objective holds off the marginal.
"""

from .dm_regulariser import DistributionMatchingRegulariser, distribution_matching
from .fake_score import (
    FAKE_INITS,
    ResidualFakeScore,
    build_fake_score,
    check_fake_config,
    check_single_guidance,
    fake_dsm_loss,
)
from .functional import dmd_gradient, dsm_loss, edm_loss_weight, gradient_injection_loss, mean_dims
from .gan import (
    FeatureTap,
    GANHead,
    build_gan_head,
    feature_module,
    gan_critic_loss,
    gan_critic_terms,
    gan_generator_loss,
    no_param_grad,
    noised_logits,
)
from .jvp import JVP_METHODS, check_jvp_method, jvp, same_randomness
from .rollout import check_levels, generator_rollout
from .score_implicit import SIM_DISTANCES, distance_grad, sim_rows, sim_sample_grad
from .sigmas import SIGMA_DENSITIES, SigmaSampler, check_sigma_config, check_wide, widen_noise

__all__ = [
    "SIM_DISTANCES",
    "distance_grad",
    "sim_rows",
    "sim_sample_grad",
    "DistributionMatchingRegulariser",
    "distribution_matching",
    "JVP_METHODS",
    "check_jvp_method",
    "jvp",
    "same_randomness",
    "FAKE_INITS",
    "ResidualFakeScore",
    "build_fake_score",
    "check_fake_config",
    "fake_dsm_loss",
    "check_single_guidance",
    "dmd_gradient",
    "dsm_loss",
    "edm_loss_weight",
    "gradient_injection_loss",
    "mean_dims",
    "FeatureTap",
    "GANHead",
    "build_gan_head",
    "feature_module",
    "gan_critic_loss",
    "gan_critic_terms",
    "noised_logits",
    "gan_generator_loss",
    "no_param_grad",
    "check_levels",
    "generator_rollout",
    "SIGMA_DENSITIES",
    "SigmaSampler",
    "check_sigma_config",
    "check_wide",
    "widen_noise",
]
