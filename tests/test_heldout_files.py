"""A model's held-out images are found by name, then checked by content: MVTec folders of different
categories all name their images 000.png, 001.png, ..., so a name alone does not say it is the same image."""

import hashlib
import shutil

import numpy as np
import pytest
from PIL import Image

import anomap
from anomap.cli import main as cli_main
from anomap.data.dataset import train_images
from anomap.errors import ConfigError
from test_gtrans import TINY

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def saved(tiny_category, tmp_path_factory):
    det = anomap.create("gtrans", **TINY, max_steps=1, min_heldout=4, checkpoint_every=0)
    det.fit(tiny_category, progress=False)
    return det.save(tmp_path_factory.mktemp("heldout") / "g.safetensors")


def test_fit_stores_a_fingerprint_of_each_heldout_image(saved, tiny_category):
    det = anomap.load(saved)
    names, digests = det.info["heldout_files"], det.info["heldout_sha256"]
    assert len(names) == len(digests) == 4
    by_name = {p.name: p for p in train_images(tiny_category)}
    assert digests == [hashlib.sha256(by_name[n].read_bytes()).hexdigest()[:16] for n in names]
    assert [p.name for p in det.heldout_paths(tiny_category)] == sorted(names)


def test_same_names_with_other_content_are_refused(saved, tiny_category, tmp_path, capsys):
    det = anomap.load(saved)
    other = tmp_path / "copy"
    shutil.copytree(tiny_category, other)
    assert [p.name for p in det.heldout_paths(other)] == sorted(det.info["heldout_files"])  # an exact copy is fine
    victim = other / "train" / "good" / det.info["heldout_files"][1]
    img = np.asarray(Image.open(victim)).copy()
    img[0, 0] ^= 1  # one bit of one pixel
    Image.fromarray(img).save(victim)
    with pytest.raises(ConfigError, match=rf"1 of the model's 4 held-out images .*first: {victim.name}"):
        det.heldout_paths(other)
    with pytest.raises(ConfigError, match="other content"):  # rescoring must not recalibrate on them
        det.rescore({"image_score": "topk_mean"}, other)
    assert det.config.image_score == "max"
    # the CLI's rescoring path: one line naming the folder and the fix, exit code 2
    code = cli_main(["evaluate", "--model", str(saved), "--data", str(other), "-q", "--set", "image_score=topk_mean"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert str(other) in err[0] and "other content" in err[0] and "trained on" in err[0]


def test_a_model_without_fingerprints_is_refused_with_the_fix(saved, tiny_category, capsys):
    det = anomap.load(saved)
    del det.info["heldout_sha256"]  # as in files of development versions of 0.1.0: no longer matched by name
    with pytest.raises(ConfigError, match="does not record its held-out images.*Fix: retrain"):
        det.heldout_paths(tiny_category)
    from anomap.export.onnx import heldout_images

    assert heldout_images(det) == []  # the export then asks for --images instead


def test_onnx_parity_images_are_the_heldout_images_only_while_unchanged(tiny_category, tmp_path):
    from anomap.export.onnx import heldout_images

    data = tmp_path / "data"
    shutil.copytree(tiny_category, data)
    det = anomap.create("gtrans", **TINY, max_steps=1, min_heldout=4, checkpoint_every=0)
    det.fit(data, progress=False)
    assert [p.name for p in heldout_images(det)] == sorted(det.info["heldout_files"])
    victim = data / "train" / "good" / det.info["heldout_files"][0]
    img = np.asarray(Image.open(victim)).copy()
    img[0, 0] ^= 1
    Image.fromarray(img).save(victim)
    assert heldout_images(det) == []  # the export then asks for --images instead of checking on other images
