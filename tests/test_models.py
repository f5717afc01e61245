import pytest
import torch

from toolkit.core.errors import ToolkitError
from toolkit.models import count_parameters, create_model, get_entry, list_models

EXPECTED = {"lenet", "convnet", "cnn3x3", "widecnn", "mlp", "tinycnn", "stridecnn", "fcnet"}


def test_zoo_holds_the_classic_networks():
    assert set(list_models()) >= EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_every_model_maps_a_batch_of_digits_to_ten_logits(name):
    model = create_model(name).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert torch.isfinite(out).all()
    assert get_entry(name).source, f"{name} needs a docstring naming its source"


@pytest.mark.parametrize(
    ("name", "params"),
    [("mlp", 135_160), ("tinycnn", 135_410), ("lenet", 61_706)],
)
def test_parameter_budgets_match_the_notebooks(name, params):
    assert count_parameters(create_model(name)) == params


def test_layer_shapes_follow_the_spec():
    lenet = create_model("lenet")
    convs = [m for m in lenet.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (1, 6, (5, 5), (2, 2)), (6, 16, (5, 5), (0, 0))]
    linears = [m for m in create_model("fcnet").modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 1500), (1500, 1000), (1000, 500), (500, 10)]
    widecnn_fc = next(m for m in create_model("widecnn").modules() if isinstance(m, torch.nn.Linear))
    assert widecnn_fc.in_features == 50_176


def test_unknown_model_names_the_known_ones():
    with pytest.raises(ToolkitError, match=r"known models: .*lenet"):
        create_model("resnet9000")
