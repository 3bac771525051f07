"""benchmarks/heldout_loss.py: the label-free criterion that chose gtrans's learning rate."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import anomap
from anomap.data.dataset import train_images
from anomap.data.tensors import to_tensor
from anomap.data.transforms import load_stack
from test_gtrans import TINY

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import heldout_loss  # a benchmark script, not part of the package

pytestmark = pytest.mark.usefixtures("one_thread")


def test_heldout_loss_is_the_training_loss_on_the_heldout_images(tiny_category, tmp_path, capsys):
    det = anomap.create("gtrans", **TINY, max_steps=3, min_heldout=4, checkpoint_every=0)
    det.fit(tiny_category, progress=False)
    model = det.save(tmp_path / "g.safetensors")
    assert heldout_loss.main(["--model", str(model), "--data", str(tiny_category)]) == 0
    out = json.loads(capsys.readouterr().out)
    names = set(det.info["heldout_files"])
    held = sorted(p for p in train_images(tiny_category) if p.name in names)
    x = to_tensor(load_stack(held, 64, int(det.channels)), "cpu")
    det.model.eval()
    det.model.config.hard_fraction = 0.0  # the criterion is the plain mean over locations, whatever the training used
    with torch.no_grad():
        expected = float(det.model.training_step({"image": x}, 0)["loss"])  # all held-out images in one batch
    assert out["n_heldout"] == len(held) == 4 and len(out["token"]) == len(out["feature"]) == 3
    assert out["loss"] == pytest.approx(expected, rel=1e-3)
    assert np.isclose(out["loss"], sum(out["token"]) + 0.5 * sum(out["feature"]), rtol=1e-3)


def test_heldout_loss_refuses_a_folder_without_the_heldout_images(tiny_category, tmp_path):
    det = anomap.create("gtrans", **TINY, max_steps=1, min_heldout=4, checkpoint_every=0)
    det.fit(tiny_category, progress=False)
    other = tmp_path / "other"
    (other / "train" / "good").mkdir(parents=True)
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(other / "train" / "good" / "unrelated.png")
    with pytest.raises(SystemExit, match="held-out images were not all found in this folder"):
        heldout_loss.heldout_loss(det, str(other))


def test_fit_images_measures_the_images_it_was_trained_on(tiny_category, tmp_path, capsys):
    det = anomap.create("gtrans", **TINY, max_steps=3, min_heldout=4, checkpoint_every=0)
    det.fit(tiny_category, progress=False)
    model = det.save(tmp_path / "g.safetensors")
    assert heldout_loss.main(["--model", str(model), "--data", str(tiny_category), "--fit-images"]) == 0
    out = json.loads(capsys.readouterr().out)
    names = set(det.info["heldout_files"])
    fit = sorted(p for p in train_images(tiny_category) if p.name not in names)
    x = to_tensor(load_stack(fit, 64, int(det.channels)), "cpu")
    det.model.eval()
    det.model.config.hard_fraction = 0.0
    with torch.no_grad():
        expected = float(det.model.training_step({"image": x}, 0)["loss"])
    assert (out["images"], out["n_images"], out["n_heldout"]) == ("fit", len(fit), 4) and len(fit) > 4
    assert out["loss"] == pytest.approx(expected, rel=1e-3)
