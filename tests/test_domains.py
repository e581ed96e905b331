"""BatchNorm keeps one set of statistics per domain: the encoders serve the statistics they trained with.

Training normalises scenes and products in separate batches; a model that blends both into one running
average at inference serves another model than the one it trained (issue 15)."""

import pytest
import torch

from style_model.config import ModelConfig
from style_model.domains import DomainBatchNorm, set_domain
from style_model.model import StyleModel


def _norms(model):
    return [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def _model() -> StyleModel:
    torch.manual_seed(0)
    return StyleModel(ModelConfig(backbone="small", input_size=64, grid=2, embed_dim=16, dropout=0.0))


def test_every_batchnorm_of_the_model_keeps_statistics_per_domain():
    model = _model()
    assert _norms(model) and all(isinstance(m, DomainBatchNorm) for m in _norms(model))


def test_served_encoders_normalise_each_domain_with_its_own_training_statistics():
    """Scenes dark, products bright: in training each is normalised with its own batch statistics. With
    cumulative running averages of exactly those batches, eval mode must give what training computed;
    one blended average (the old BatchNorm) gives something else."""
    model = _model()
    for m in _norms(model):
        m.momentum = None  # cumulative average: after one batch, the running stats are that batch's
    scenes = torch.rand(64, 3, 64, 64) * 0.2
    products = 0.8 + torch.rand(64, 3, 64, 64) * 0.2
    model.train()
    with torch.no_grad():
        trained_scene = model.encode_scene(scenes)
        trained_product = model.encode_product(products)
    model.eval()
    with torch.no_grad():
        served_scene = model.encode_scene(scenes)
        served_product = model.encode_product(products)
    # running_var is the unbiased variance, batch normalisation uses the biased one: close, not equal
    for trained, served in zip((*trained_scene, *trained_product), (*served_scene, *served_product)):
        torch.testing.assert_close(served, trained, atol=0.02, rtol=0.02)


def test_a_state_without_product_statistics_serves_products_with_the_scene_statistics():
    """torchvision's checkpoints and models trained before the split have one set: both domains use it,
    as before, so old runs load and serve unchanged."""
    model = _model()
    old = {k: v for k, v in model.state_dict().items() if ".product_" not in k}
    for k in old:
        if k.endswith("running_mean"):
            old[k] = torch.randn_like(old[k])
    fresh = _model()
    fresh.load_state_dict(old, strict=True)
    for m in _norms(fresh):
        torch.testing.assert_close(m.product_mean, m.running_mean)
        torch.testing.assert_close(m.product_var, m.running_var)


def test_set_domain_refuses_an_unknown_domain():
    with pytest.raises(ValueError, match="expected one of"):
        set_domain(_model(), "scenes")
