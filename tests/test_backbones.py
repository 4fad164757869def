"""The registry, parametrized over every entry: head contract, freezing, BatchNorm, weights."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from edgetl import backbones
from edgetl.backbones import find_weights, list_backbones, load_pretrained, preprocess_spec
from edgetl.errors import EdgetlError
from edgetl.model import build_classifier, freeze_backbone, set_train_mode, trainable_parameters, unfreeze_top

ALL = [e.name for e in list_backbones()]
# The test at the bottom fails if an entry is registered without being in this list on purpose.
TESTED = {
    "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "mobilenetv2_100",
    "mobilenetv3_large_100", "mobilenetv3_small_100", "efficientnet_b0", "tiny",
}  # fmt: skip


def test_every_registered_backbone_is_tested() -> None:
    assert set(ALL) == TESTED, "a backbone was added or removed: update TESTED and check it passes below"


@pytest.mark.parametrize("name", ALL)
def test_head_shape_and_stage1_freezing(name: str) -> None:
    model = build_classifier(name, num_classes=7).eval()
    size = 64  # any size works for these fully convolutional nets; small keeps the suite fast
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, 7)
    freeze_backbone(model)
    trainable = {id(p) for p in trainable_parameters(model)}
    assert trainable == {id(p) for p in model.head.parameters()}


@pytest.mark.parametrize("name", ALL)
def test_stage2_unfreezes_only_the_top_and_keeps_batchnorm_statistics(name: str) -> None:
    torch.manual_seed(0)
    model = build_classifier(name, num_classes=3)
    unfrozen = unfreeze_top(model, 2)
    assert unfrozen[0].startswith("blocks.")
    assert not any(p.requires_grad for p in model.backbone.conv_stem.parameters())
    assert all(p.requires_grad for p in model.backbone.blocks[-1].parameters())
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    before = [(m.running_mean.clone(), m.running_var.clone()) for m in bns]
    set_train_mode(model)
    assert model.training and all(not m.training for m in bns)
    opt = torch.optim.SGD(trainable_parameters(model), lr=0.1)
    loss = model(torch.randn(4, 3, 64, 64)).logsumexp(1).mean()
    loss.backward()
    opt.step()
    after = [(m.running_mean, m.running_var) for m in bns]
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(before, after, strict=True))
    frozen_grads = [p.grad for p in model.backbone.conv_stem.parameters()]
    assert all(g is None for g in frozen_grads)


@pytest.mark.parametrize("name", ALL)
def test_preprocessing_comes_from_timm(name: str) -> None:
    spec = preprocess_spec(name)
    assert spec.resize_size >= spec.input_size
    if name.startswith("efficientnet_lite"):
        assert spec.mean == (0.5, 0.5, 0.5) and spec.std == (0.5, 0.5, 0.5)
    assert preprocess_spec(name, input_size=128).input_size == 128


def test_unknown_backbone() -> None:
    with pytest.raises(EdgetlError, match="unknown backbone"):
        backbones.get_entry("resnet9000")


def test_lite0_weights_ship_offline_and_load() -> None:
    found = find_weights("efficientnet_lite0")
    assert found is not None and found[0] == "package"
    model = backbones.create_feature_extractor("efficientnet_lite0")
    notes: list[str] = []
    source = load_pretrained(model, "efficientnet_lite0", None, notes.append)
    assert source.startswith("package:")
    assert any("dropped the source classifier" in n for n in notes)
    # ImageNet statistics, not the random initialisation: the stem BN has learnt running stats.
    assert not torch.allclose(model.bn1.running_var, torch.ones_like(model.bn1.running_var))


def test_weights_file_with_another_classifier_loads_without_it(tmp_path: Path) -> None:
    import timm

    src = timm.create_model("test_efficientnet", num_classes=5)
    torch.save(src.state_dict(), tmp_path / "w.pt")
    model = backbones.create_feature_extractor("tiny")
    notes: list[str] = []
    load_pretrained(model, "tiny", tmp_path / "w.pt", notes.append)
    assert torch.equal(model.conv_stem.weight, src.conv_stem.weight)
    assert notes and "classifier" in notes[0]


def test_safetensors_weights(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    src = timm.create_model("test_efficientnet", num_classes=0)
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    model = backbones.create_feature_extractor("tiny")
    load_pretrained(model, "tiny", tmp_path / "w.safetensors", lambda _m: None)
    assert torch.equal(model.conv_head.weight, src.conv_head.weight)


def test_weights_of_another_network_are_refused(tmp_path: Path) -> None:
    import timm

    torch.save(timm.create_model("mobilenetv3_small_100").state_dict(), tmp_path / "other.pt")
    with pytest.raises(EdgetlError, match="do not fit"):
        load_pretrained(backbones.create_feature_extractor("tiny"), "tiny", tmp_path / "other.pt", print)


def test_pickled_objects_are_never_unpickled(tmp_path: Path) -> None:
    torch.save({"state_dict": {"a": torch.zeros(1)}, "evil": Path("x")}, tmp_path / "evil.pt")
    with pytest.raises(EdgetlError, match="cannot read weights"):
        backbones.read_state_dict(tmp_path / "evil.pt")


def test_missing_weights_suggest_the_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(backbones, "_timm_cache_file", lambda _id: None)
    with pytest.raises(EdgetlError, match=r"--weights FILE.*--no-pretrained"):
        load_pretrained(backbones.create_feature_extractor("mobilenetv2_100"), "mobilenetv2_100", None, print)
