"""Models: shapes, weights from a local file equal the file, the offline error."""

import pytest
import timm
import torch

from fed_app.config import RunConfig
from fed_app.task.model import ModelWeightsError, build_model

HEAD_KEYS = ("head.weight", "head.bias")  # the ViTs' classifier


def test_tiny_vit_forward_shape_and_seeded_head():
    cfg = RunConfig(model="vit-tiny-test")
    model, spec = build_model(cfg, 100)
    assert spec.input_size == 32
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 100)
    same, _ = build_model(cfg, 100)
    other, _ = build_model(cfg.replace(seed=7), 100)
    assert torch.equal(model.head.weight, same.head.weight)
    assert not torch.equal(model.head.weight, other.head.weight)


@pytest.fixture(scope="module")
def dino_file(tmp_path_factory):
    """A ViT-S/16 backbone saved as DINO releases it: a plain state dict without a classifier."""
    source = timm.create_model("vit_small_patch16_224.dino", pretrained=False, num_classes=0)
    path = tmp_path_factory.mktemp("w") / "dino_deitsmall16_pretrain.pth"
    torch.save(source.state_dict(), path)
    return path, source.state_dict()


def test_vit_small_dino_loads_a_local_weights_file_exactly(dino_file):
    path, expected = dino_file
    model, spec = build_model(RunConfig(model_weights=str(path)), 100)
    config = timm.get_pretrained_cfg("vit_small_patch16_224.dino").to_dict()  # timm's own data config for it
    assert (spec.input_size, spec.interpolation) == (224, config["interpolation"]) == (224, "bicubic")
    assert (spec.mean, spec.std) == (tuple(config["mean"]), tuple(config["std"]))
    got = model.state_dict()
    assert set(got) - set(expected) == set(HEAD_KEYS)
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), key
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 224, 224)).shape == (2, 100)


def test_dino_training_checkpoint_format_is_read_too(tmp_path):
    source, _ = build_model(RunConfig(model="vit-tiny-test", seed=3), 100)
    wrapped = {"teacher": {f"backbone.{k}": v for k, v in source.state_dict().items()
                           if not k.startswith("head.")}, "epoch": 100}
    wrapped["teacher"]["head.mlp.0.weight"] = torch.zeros(4, 4)  # DINO's projection head: ignored
    path = tmp_path / "checkpoint.pth"
    torch.save(wrapped, path)
    model, _ = build_model(RunConfig(model="vit-tiny-test", model_weights=str(path)), 100)
    assert torch.equal(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)


def test_a_file_of_another_architecture_is_refused(tmp_path):
    tiny, _ = build_model(RunConfig(model="vit-tiny-test"), 100)
    path = tmp_path / "tiny.pth"
    torch.save(tiny.state_dict(), path)
    with pytest.raises(ModelWeightsError, match="lacks .* backbone tensors"):
        build_model(RunConfig(model_weights=str(path)), 100)


def test_offline_without_weights_names_the_model_weights_key(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    with pytest.raises(ModelWeightsError) as err:
        build_model(RunConfig(), 100)
    message = str(err.value)
    assert "model-weights=" in message and "random" in message and "\n" not in message


def test_missing_weights_file_is_one_sentence():
    with pytest.raises(ModelWeightsError, match="is not a file"):
        build_model(RunConfig(model_weights="/nowhere/weights.pth"), 100)


@pytest.mark.parametrize("name", ["test_resnet.r160_in1k", "test_convnext.r160_in1k"])
def test_any_timm_model_by_name_loads_a_local_weights_file_with_its_own_classifier_and_data_config(tmp_path, name):
    import timm

    from fed_app.task.head import head_module, head_name

    source = timm.create_model(name, pretrained=False)  # as a timm checkpoint holds it: 1000-class classifier
    file = tmp_path / "pytorch_model.bin"
    torch.save(source.state_dict(), file)
    model, spec = build_model(RunConfig(model=name, model_weights=str(file)), 7)
    prefix = head_name(model) + "."
    assert prefix in ("fc.", "head.fc.")  # ResNet's fc; ConvNeXt's head.fc (its head.norm is backbone)
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items() if not k.startswith(prefix))
    assert head_module(model).weight.shape[0] == 7
    timm_config = timm.data.resolve_data_config({}, model=source)  # the model's own data configuration
    assert (spec.input_size, spec.interpolation, spec.mean) == (160, timm_config["interpolation"], (0.5, 0.5, 0.5))


def test_a_centralized_run_with_another_timm_architecture_fits_its_head_and_trains(tmp_path):
    from fed_app import centralized

    cfg = RunConfig(dataset="synthetic", model="test_convnext.r160_in1k", model_weights="random",
                    synthetic_train_size=96, synthetic_test_size=32, val_size=16, batch_size=16, eval_batch_size=32,
                    epochs=1, head="ridge", device="cpu", run_dir=str(tmp_path / "run"))
    run = centralized.run(cfg)
    rows = run.rows()
    assert [r["epoch"] for r in rows] == [0, 1] and rows[0]["head_temperature"] > 0
    frozen = torch.load(run.checkpoint_file, weights_only=True)["model"]
    model, _ = build_model(cfg, 100)
    assert not torch.equal(frozen["head.norm.weight"], model.state_dict()["head.norm.weight"])  # backbone trains
