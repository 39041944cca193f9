"""Evaluation metrics: Fréchet distance over features of a network, and the networks that give them.

``frechet``: feature statistics and the Fréchet distance between two Gaussians. ``features``: the
``FeatureNet`` interface and ``load_feature_net('classifier:PATH' | 'inception:PATH')``. ``classifier``: a small
CNN trained here on the procedural dataset (the offline demo's feature net and label reader). ``inception``:
pytorch-fid's FID Inception-v3 in Flax, from a user-supplied weights file.
"""

from perflow_jax.evaluation.features import FeatureNet
from perflow_jax.evaluation.features import FeatureNetError
from perflow_jax.evaluation.features import load_feature_net
from perflow_jax.evaluation.frechet import feature_statistics
from perflow_jax.evaluation.frechet import frechet_distance
