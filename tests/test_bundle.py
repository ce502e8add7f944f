"""Model bundles: the validated card (required task, typed keys, bounded sizes), the weights' hash,
and a Predictor that threads can share. Tiny models built here; no shipped bundle needed except in
the test that checks the shipped ones."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from mammocad.errors import ConfigError, InputError
from mammocad.inference.predictor import Predictor
from mammocad.io.discover import file_sha256
from mammocad.models import create_model
from mammocad.models import registry
from mammocad.models.bundle import CARD_FILE, WEIGHTS_FILE, list_bundles, load_bundle, read_card, save_bundle
from mammocad.preprocess.pipeline import PreprocessSpec


def card(name: str = "tiny", **over) -> dict:
    base = {"name": name, "version": "0.1", "task": "segment",
            "preprocessing": PreprocessSpec(modality="US", long_side=96).model_dump(mode="json"),
            "thresholds": {"probability": 0.5, "min_area": 4},
            "tiling": {"tile": 32, "overlap": 0.25, "mode": "sliding", "batch_size": 2, "tta": ["hflip"]}}
    return {**base, **over}


def tiny_bundle(directory: Path, seed: int = 0, **over) -> Path:
    torch.manual_seed(seed)
    model = create_model("unet", num_classes=1, base_channels=4, depth=2, norm="group")
    return save_bundle(directory, model.eval(), card(**over))


def edit_card(bundle: Path, change) -> None:
    path = bundle / CARD_FILE
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


# ---- the card ----------------------------------------------------------------------------------
def test_a_card_without_a_task_is_refused_with_the_fix(tmp_path):
    bundle = tiny_bundle(tmp_path / "b")
    edit_card(bundle, lambda c: c.pop("task"))
    with pytest.raises(InputError) as err:
        read_card(bundle)
    assert str(err.value) == (f"{bundle / CARD_FILE}: task: required key is missing; a segmentation model's card "
                              "needs \"task\": \"segment\" (add it to the card)")
    with pytest.raises(InputError, match="task: required key is missing"):
        Predictor(bundle, device="cpu")
    edit_card(bundle, lambda c: c.update(task="segmentation"))  # what training wrote before
    with pytest.raises(InputError, match="'segmentation' is the old name; write \"task\": \"segment\""):
        load_bundle(bundle)
    edit_card(bundle, lambda c: c.update(task="denoise"))
    with pytest.raises(InputError, match=r"task: Input should be 'segment', 'detect' or 'classify' \(got 'denoise'\)"):
        load_bundle(bundle)


def test_predict_and_evaluate_refuse_a_model_of_another_task(tmp_path):
    """A classification card must not run as a lesion model: refused by name, before any weights are read."""
    from mammocad.tasks import get_task

    bundle = tiny_bundle(tmp_path / "cls", name="lesion-classifier")
    edit_card(bundle, lambda c: c.update(task="classify"))
    (bundle / WEIGHTS_FILE).write_bytes(b"never read")
    with pytest.raises(ConfigError) as err:
        Predictor(bundle, device="cpu")
    assert str(err.value) == (f"{bundle}: model lesion-classifier is a classify model; this command runs segment "
                              "and detect models")
    model = create_model("unet", num_classes=1, base_channels=4, depth=2)
    with pytest.raises(ConfigError, match="is a classify model; this command runs segment and detect models"):
        Predictor((model, card(task="classify", architecture=model.mammocad_config)), device="cpu")
    with pytest.raises(ConfigError, match="task 'grade' is not available in this mammocad; known: classify, detect, segment"):
        get_task("grade")


def test_card_mistakes_are_one_line_errors_naming_the_key(tmp_path):
    bundle = tiny_bundle(tmp_path / "b")
    path = bundle / CARD_FILE
    cases = [
        (lambda c: c["tiling"].update(tiles=64), "tiling.tiles: unknown key"),  # a typo no longer falls back to a default
        (lambda c: c["thresholds"].update(probability=1.5), "thresholds.probability: Input should be less than 1"),
        (lambda c: c.update(class_names=["lesion"]), "class_names: List should have at least 2 items"),
        (lambda c: c.pop("preprocessing"), "preprocessing: required key is missing"),
        (lambda c: c.update(weights_sha256="abc"), "weights_sha256: String should match pattern"),
        (lambda c: c.update(format_version=99), "bundle format 99 is newer than this mammocad reads"),
        (lambda c: c.pop("format"), "not a mammocad model card (expected \"format\": \"mammocad-model-bundle\")"),
    ]
    original = path.read_text()
    for change, message in cases:
        path.write_text(original)
        edit_card(bundle, change)
        with pytest.raises(InputError) as err:
            load_bundle(bundle)
        assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match=r"model\.json: task: required key is missing"):  # never written invalid
        save_bundle(tmp_path / "bad", create_model("logreg", scales=[1.0]), {"name": "x"})
    assert not (tmp_path / "bad" / WEIGHTS_FILE).exists()


# ---- integrity and size bounds -----------------------------------------------------------------
def test_swapped_weights_are_refused(tmp_path):
    a, b = tiny_bundle(tmp_path / "a", seed=0), tiny_bundle(tmp_path / "b", seed=1)
    assert read_card(a).weights_sha256 == file_sha256(a / WEIGHTS_FILE)  # written by save_bundle
    load_bundle(a)
    (a / WEIGHTS_FILE).write_bytes((b / WEIGHTS_FILE).read_bytes())  # same architecture, other weights
    with pytest.raises(InputError) as err:
        load_bundle(a)
    assert str(err.value) == (f"{a / WEIGHTS_FILE}: weights do not match the card's weights_sha256 "
                              "(a different or damaged file)")
    with pytest.raises(InputError, match="weights do not match"):
        Predictor(a, device="cpu")


def test_sizes_are_bounded_before_anything_is_built(tmp_path, monkeypatch):
    """``base_channels: 4096`` took 23.5 GB before it was killed, ``long_side: 30000`` minutes: refused
    at once, the model only ever built on the meta device (no memory)."""
    built_on = []
    registry.list_models()  # registers the built-in models (lazily imported), whatever ran before
    unet = registry._MODELS["unet"]

    def spy(**kwargs):
        built_on.append(torch.empty(0).device.type)
        return unet(**kwargs)

    monkeypatch.setitem(registry._MODELS, "unet", spy)
    bundle = tiny_bundle(tmp_path / "b")
    built_on.clear()
    edit_card(bundle, lambda c: c["architecture"]["kwargs"].update(base_channels=4096))
    start = time.monotonic()
    with pytest.raises(InputError, match=r"architecture cannot be built: .*M parameters exceed the bound of 200 M"):
        load_bundle(bundle)
    assert time.monotonic() - start < 5 and built_on == ["meta"]
    with pytest.raises(ConfigError, match=r"model unet: depth: 40 exceeds the bound 8"):
        create_model("unet", depth=40)
    with pytest.raises(ConfigError, match=r"model shallow_cnn: channels: 100000 exceeds the bound 4096"):
        create_model("shallow_cnn", channels=100000)

    for change, message in [
        (lambda c: c["preprocessing"].update(long_side=30000), "image size [30000] exceeds the 8192-pixel bound"),
        (lambda c: c["preprocessing"].update(long_side=None, size=[512, 20000]), "exceeds the 8192-pixel bound"),
        (lambda c: c["tiling"].update(tile=100000), "tiling.tile: Input should be less than or equal to 2048"),
        (lambda c: c["tiling"].update(batch_size=10000), "tiling.batch_size: Input should be less than or equal to 64"),
    ]:
        fresh = tiny_bundle(tmp_path / "fresh")
        edit_card(fresh, change)
        with pytest.raises(InputError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load_bundle(fresh)

    with pytest.raises(ConfigError, match=r"^--batch-size: must be between 1 and 64, got 5000$"):
        Predictor(tiny_bundle(tmp_path / "fresh"), device="cpu", batch_size=5000)

    from mammocad.training.config import parse_config

    with pytest.raises(ConfigError, match=r"inference\.tile: Input should be less than or equal to 2048"):
        parse_config({"data": {"prepared": "p"}, "model": {"name": "unet"}, "inference": {"tile": 30000}}, "c.yaml")


def test_shipped_cards_validate_and_their_weights_match():
    names = list_bundles()
    assert {"mammo-lesion-seg", "mammo-lesion-det", "us-lesion-seg"} <= set(names)
    for name in names:
        c = read_card(name)
        assert c.weights_sha256 is not None
        model, _ = load_bundle(name)  # the hash is checked
        assert model.num_classes == len(c.class_names) - 1
        assert c.task == getattr(model, "task", "segment")
        if "cross_validation" in (c.model_extra or {}):  # a cross-validated card names its recipe and folds
            cv = c.model_extra["cross_validation"]
            assert cv["n_folds"] >= 3 and cv["config"].startswith("configs/") and cv["command"].startswith("mammocad cv")
            assert c.model_extra["weights_dtype"] == "float16" and c.tiling.autocast == "fp32"


# ---- a Predictor shared by threads -------------------------------------------------------------
def test_threads_share_a_predictor_and_get_the_serial_results(tmp_path):
    bundle = tiny_bundle(tmp_path / "b")
    rng = np.random.default_rng(0)
    images = [rng.random((96, 80), dtype=np.float32) for _ in range(3)]
    pngs = []
    for i, img in enumerate(images):
        pngs.append(tmp_path / f"us{i}.png")
        cv2.imwrite(str(pngs[-1]), np.round(img * 255).astype(np.uint8))
    outside = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        predictor = Predictor(bundle, device="cpu", autocast="fp32", num_threads=1)  # a process setting, set once
        configured = torch.get_num_threads()
        assert configured == 1
        serial = [predictor.infer(img, None) for img in images]
        serial_lesions = [[les.to_dict() for les in predictor.predict_image(p).prediction.lesions] for p in pngs]

        def one(i: int) -> tuple[np.ndarray, list[dict]]:
            j = i % len(images)
            return predictor.infer(images[j], None), [les.to_dict() for les in
                                                              predictor.predict_image(pngs[j]).prediction.lesions]

        with ThreadPoolExecutor(max_workers=6) as pool:
            results = list(pool.map(one, range(18)))
        for i, (probs, lesions) in enumerate(results):
            assert np.array_equal(probs, serial[i % len(images)]), i
            assert lesions == serial_lesions[i % len(images)], i
        assert torch.get_num_threads() == configured  # no call changed the process's thread count
        assert predictor.model.inc[0].weight.is_contiguous(memory_format=torch.channels_last)  # converted once
    finally:
        torch.set_num_threads(outside)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_weights_halve_the_file_and_keep_the_outputs(tmp_path, dtype):
    """Shipped bundles store fp16/bf16 weights; they load back into the fp32 model (cast by
    load_state_dict) and change its probabilities by less than the rounding allows."""
    torch.manual_seed(0)
    model = create_model("unet", num_classes=1, base_channels=8, depth=3, norm="batch").eval()
    full = save_bundle(tmp_path / "fp32", model, card())
    half = save_bundle(tmp_path / dtype, model, card(), weights_dtype=dtype)
    assert (half / WEIGHTS_FILE).stat().st_size < 0.55 * (full / WEIGHTS_FILE).stat().st_size
    assert read_card(half).model_extra["weights_dtype"] == dtype
    loaded, _ = load_bundle(half)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        ref, got = torch.sigmoid(model(x)), torch.sigmoid(loaded(x))
    bound = 5e-3 if dtype == "float16" else 3e-2  # bf16 keeps 8 mantissa bits, fp16 11
    assert float((ref - got).abs().max()) < bound
    assert float((ref - got).abs().max()) > 0  # the weights really were rounded
    with pytest.raises(ConfigError, match="weights_dtype: must be one of"):
        save_bundle(tmp_path / "bad", model, card(), weights_dtype="int8")


def test_auto_autocast_follows_the_card(tmp_path):
    """A model trained and validated in fp32 (card ``tiling.autocast: fp32``) is not run in bf16 by
    ``--autocast auto``; an explicit choice still wins."""
    bundle = tiny_bundle(tmp_path / "b")
    assert Predictor(bundle, device="cpu").autocast == "auto"  # cards without the key: as before
    edit_card(bundle, lambda c: c["tiling"].update(autocast="fp32"))
    assert Predictor(bundle, device="cpu").autocast == "fp32"
    assert Predictor(bundle, device="cpu", autocast="bf16").autocast == "bf16"
