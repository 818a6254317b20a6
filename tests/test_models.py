import pytest
import torch

from synthaug.classify import MODELS, Classifier, create_model
from synthaug.errors import SynthaugError


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("channels,size", [(1, 8), (3, 16)])
def test_registered_models_forward_and_round_trip(name, channels, size, tmp_path):
    model = create_model(name, num_classes=4, in_channels=channels, image_size=size).eval()
    x = torch.rand(2, channels, size, size)
    feats = model.forward_features(x)
    assert feats.ndim == 2 and feats.shape[1] == model.head.in_features
    assert model(x).shape == (2, 4)
    model.set_normalization(torch.full((channels,), 0.3), torch.full((channels,), 0.2))
    model.save_pretrained(tmp_path / name)
    loaded = Classifier.from_pretrained(tmp_path / name).eval()
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    assert not list(tmp_path.glob("**/*.pt")) and not list(tmp_path.glob("**/*.bin"))


def test_unknown_model():
    with pytest.raises(SynthaugError, match="unknown model"):
        create_model("vgg99", num_classes=2, in_channels=1, image_size=8)


def test_from_pretrained_missing_files(tmp_path):
    with pytest.raises(SynthaugError, match="no config.json"):
        Classifier.from_pretrained(tmp_path)


def test_corrupt_weights(tmp_path):
    model = create_model("small-cnn", num_classes=2, in_channels=1, image_size=8)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(SynthaugError, match="cannot load"):
        Classifier.from_pretrained(tmp_path)
