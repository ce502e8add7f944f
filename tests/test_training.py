"""Training (mammocad.training + models.bundle): config errors, LR schedule, checkpoints and bundles
without pickle, resume = uninterrupted run, early stopping, staged freezing, on a tiny prepared
dataset built in a tmp dir (tests/tiny_prepared.py). One thread per run: the machine is shared."""

from __future__ import annotations

import csv
import hashlib
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mammocad.cli import main
from mammocad.errors import ConfigError, InputError
from mammocad.models import create_model
from mammocad.models.bundle import list_bundles, load_bundle, save_bundle
from mammocad.preprocess.pipeline import PreprocessSpec
from mammocad.tasks.segment import check_patch_size, load_split
from mammocad.training import builders as B
from mammocad.training.checkpoint import join_optimizer_state, split_optimizer_state
from mammocad.training.config import load_config, parse_config
from mammocad.training.distributed import pick_device
from mammocad.training.engine import train

from tiny_prepared import TRAIN_IDS, VAL_IDS, make_tiny_prepared, write_config

REPO = Path(__file__).resolve().parents[1]
TIMING_COLUMNS = {"train_seconds", "patches_per_s", "epoch_seconds", "val_seconds"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("training")
    make_tiny_prepared(root)
    return root


@pytest.fixture(scope="module")
def trained(workdir):
    """2 uninterrupted epochs of a tiny U-Net (SGD, LR x0.5 every epoch, augmentation on)."""
    cfg = load_config(write_config(workdir, "base.yaml"))
    result = train(cfg, workdir / "run_full", progress=False)
    return cfg, result


def minimal_card(name: str) -> dict:
    """The least a card must say: a name, the task, how to preprocess (``models.card.ModelCard``)."""
    return {"name": name, "task": "segment", "preprocessing": PreprocessSpec(long_side=64).model_dump(mode="json")}


def read_log(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


# ---- configuration -----------------------------------------------------------------------------
def test_config_errors_name_the_file_and_the_key(workdir, capsys):
    bad_key = write_config(workdir, "bad_key.yaml", optim={"lrr": 0.1})
    with pytest.raises(ConfigError) as err:
        load_config(bad_key)
    assert str(err.value) == f"{bad_key}: optim.lrr: unknown key"

    bad_value = write_config(workdir, "bad_value.yaml", optim={"lr": -1})
    with pytest.raises(ConfigError) as err:
        load_config(bad_value)
    assert str(err.value).startswith(f"{bad_value}: optim.lr: ") and "(got -1)" in str(err.value)

    bad_yaml = workdir / "bad_yaml.yaml"
    bad_yaml.write_text("data:\n  prepared: [unclosed\n")
    with pytest.raises(ConfigError, match=r"invalid YAML at line 3"):
        load_config(bad_yaml)

    bad_stage = write_config(workdir, "bad_stage.yaml", train={"stages": [{"name": "a", "epochs": 0}]})
    with pytest.raises(ConfigError, match=r"train\.stages\.0\.epochs: Input should be greater than 0"):
        load_config(bad_stage)

    # the CLI prints it as one line and exits 1
    with pytest.raises(SystemExit) as ex:
        main(["train", str(bad_key), "--out", str(workdir / "never")])
    assert ex.value.code == 1
    err_text = capsys.readouterr().err
    assert err_text == f"mammocad: {bad_key}: optim.lrr: unknown key\n"
    assert not (workdir / "never").exists()


def test_build_time_errors_name_the_yaml_and_section(workdir):
    bad_fractions = load_config(write_config(workdir, "bad_frac.yaml", sampling={"fractions": {"lesion": 0.9}}))
    with pytest.raises(ConfigError, match=r"bad_frac\.yaml: sampling\.fractions: .*summing to 1"):
        train(bad_fractions, workdir / "bad_frac_run", progress=False)
    bad_kwarg = load_config(write_config(workdir, "bad_kw.yaml", model={"kwargs": {"depht": 2}}))
    with pytest.raises(ConfigError, match=r"bad_kw\.yaml: model\.kwargs: model unet: .*unexpected keyword argument 'depht'"):
        B.build_base_model(bad_kwarg)
    bad_patch = load_config(write_config(workdir, "bad_patch.yaml", sampling={"patch": 34}))
    with pytest.raises(ConfigError, match=r"sampling\.patch: 34 is not a multiple of the model's size_divisor 4"):
        check_patch_size(bad_patch, B.build_base_model(bad_patch))


def test_relative_paths_resolve_against_the_yaml_folder(workdir):
    cfg = load_config(write_config(workdir, "rel.yaml"))
    assert cfg.data.prepared == (workdir / "prepared").resolve()
    cfg = parse_config({"data": {"prepared": "x/y"}, "model": {"name": "unet"}}, source="a.yaml", base_dir="/data/cfg")
    assert cfg.data.prepared == Path("/data/cfg/x/y")
    assert cfg.data.class_names == ["background", "lesion"] and cfg.data.label_classes == 2


def test_every_shipped_config_validates_and_builds():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    names = {p.name for p in configs}
    assert {"mias_unet.yaml", "mias_fcn8.yaml", "mias_dilation10.yaml", "mias_deeplabv3.yaml", "mias_logreg.yaml",
            "mias_shallow_cnn.yaml", "busi_unet.yaml", "cbis_unet.yaml"} <= names
    final_arch = {}
    for path in configs:
        text = path.read_text()
        assert text.startswith("# Reproduces:") and "Full-size" in text, path.name
        cfg = load_config(path)
        model = B.build_base_model(cfg)
        for stage in cfg.stage_list():
            model = B.switch_model(cfg, stage, model)
            B.apply_stage(cfg, model, stage)  # every freeze prefix names parameters (apply_stage checks)
            if cfg.task == "segment":
                check_patch_size(cfg, model)
            else:
                assert cfg.sampling.patch % model.size_divisor == 0, path.name
        final_arch[path.name] = model.mammocad_config["name"]
    assert final_arch["mias_fcn8.yaml"] == "fcn8"  # fcn32 -> fcn16 -> fcn8
    assert [s.model_stage for s in load_config(REPO / "configs/mias_dilation10.yaml").stage_list()] == \
        ["front", "context", "global"]


# ---- optimisation pieces -----------------------------------------------------------------------
def test_step_schedule_decays_x03_every_10_epochs():
    cfg = parse_config({"data": {"prepared": "p"}, "model": {"name": "unet"},
                        "optim": {"name": "sgd", "lr": 0.1, "schedule": {"kind": "step", "every": 10, "gamma": 0.3}}})
    opt = B.build_optimizer(cfg.optim, torch.nn.Linear(2, 1))
    assert opt.param_groups[0]["momentum"] == 0.9 and opt.param_groups[0]["weight_decay"] == 5e-3
    sched = B.build_scheduler(cfg.optim, opt, epochs=35)
    lrs = []
    for _ in range(35):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    expected = [0.1] * 10 + [0.03] * 10 + [0.009] * 10 + [0.0027] * 5
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)


def test_cosine_schedule_reaches_min_lr():
    cfg = parse_config({"data": {"prepared": "p"}, "model": {"name": "unet"},
                        "optim": {"name": "adamw", "lr": 0.01, "schedule": {"kind": "cosine", "min_lr": 1e-4}}})
    opt = B.build_optimizer(cfg.optim, torch.nn.Linear(2, 1))
    sched = B.build_scheduler(cfg.optim, opt, epochs=4)
    for _ in range(4):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-4)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_optimizer_state_round_trips_without_pickle(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    cfg = parse_config({"data": {"prepared": "p"}, "model": {"name": "unet"}, "optim": {"name": name}})
    opt = B.build_optimizer(cfg.optim, model)
    for _ in range(3):
        model(torch.randn(5, 3)).sum().backward()
        opt.step()
    tensors, meta = split_optimizer_state(opt)
    assert tensors and all(isinstance(v, torch.Tensor) for v in tensors.values())
    json.dumps(meta)  # the rest is plain JSON
    fresh = B.build_optimizer(cfg.optim, model)
    fresh.load_state_dict(join_optimizer_state(tensors, json.loads(json.dumps(meta))))
    a, b = opt.state_dict(), fresh.state_dict()
    assert a["param_groups"] == [dict(g, betas=tuple(g["betas"])) if "betas" in g else g for g in b["param_groups"]]
    for i in a["state"]:
        for k, v in a["state"][i].items():
            assert torch.equal(v, b["state"][i][k]), (i, k)


def test_early_stopping_counts_validations_without_improvement():
    es = B.EarlyStopping(patience=2, min_delta=0.01)
    assert es.update(0.5, 1) and not es.should_stop
    assert not es.update(0.505, 2)  # within min_delta: not an improvement
    assert es.update(0.6, 3) and es.bad == 0
    assert not es.update(float("nan"), 4) and not es.update(0.1, 5) and es.should_stop
    assert (es.best, es.best_epoch) == (0.6, 3)
    assert B.EarlyStopping.from_dict(es.to_dict(), 2) == es


# ---- a real training run -----------------------------------------------------------------------
def test_training_writes_logs_curves_and_a_model_card(workdir, trained):
    cfg, result = trained
    run = workdir / "run_full"
    assert result.stopped == "completed" and result.epochs == 2 and result.bundle_dir == run / "bundle"
    rows = read_log(run)
    assert [r["epoch"] for r in rows] == ["1", "2"] and [r["stage"] for r in rows] == ["train", "train"]
    assert [float(r["lr"]) for r in rows] == [0.05, 0.025]  # x0.5 every epoch
    assert all(int(r["patches"]) == 16 and float(r["train_loss"]) > 0 and r["val_dice"] != "" for r in rows)
    for png in ("curves_loss.png", "curves_dice.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))

    card = json.loads((run / "bundle" / "model.json").read_text())
    assert card["architecture"] == {"name": "unet", "kwargs": {"base_channels": 4, "depth": 2, "num_classes": 1}}
    assert card["task"] == "segment" and card["weights_sha256"] == hashlib.sha256(
        (run / "bundle" / "model.safetensors").read_bytes()).hexdigest()
    assert card["class_names"] == ["background", "lesion"] and card["output"] == "sigmoid"
    assert card["thresholds"] == {"probability": 0.5, "min_area": 0, "max_lesions": None}
    assert card["tiling"]["tile"] == 32 and card["preprocessing"]["long_side"] == 64
    data = card["training_data"]
    assert data["adapter"] == "folder" and data["fold"] == 0
    assert data["splits_sha256"] == hashlib.sha256((workdir / "prepared" / "splits.json").read_bytes()).hexdigest()
    assert data["splits"]["train"] == {"cases": len(TRAIN_IDS), "patients": len(TRAIN_IDS), "lesion_cases": 5}
    assert data["splits"]["val"] == {"cases": len(VAL_IDS), "patients": len(VAL_IDS), "lesion_cases": 1}
    assert card["training"]["epochs"] == 2 and card["training"]["complete"] is True
    assert card["config"]["optim"]["lr"] == 0.05
    metrics = json.loads((run / "validation" / "metrics.json").read_text())
    assert card["validation"]["headline"] == metrics["headline"]
    assert card["validation"]["n_images"] == 2 and card["validation"]["counts"]["lesion_images"] == 1
    assert card["software"]["torch"] == torch.__version__
    best = card["training"]["stages"][0]["best_val_dice"]
    assert best == pytest.approx(max(float(r["val_dice"]) for r in rows))


def test_bundle_loads_without_pickle_and_matches_the_trained_model(workdir, trained, monkeypatch):
    from mammocad.tasks.tiling import predict_tiled

    _, result = trained

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading a bundle")

    for mod, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(mod, name, refuse)
    model, card = load_bundle(result.bundle_dir)
    monkeypatch.undo()
    assert card.name == "tiny-unet" and card.task == "segment" and not model.training
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x), result.model(x))
    image = np.random.default_rng(1).random((64, 52), dtype=np.float32)
    a = predict_tiled(model, image, tile=32, overlap=0.25, autocast="fp32")
    b = predict_tiled(result.model, image, tile=32, overlap=0.25, autocast="fp32")
    assert a.shape == (1, 64, 52) and np.array_equal(a, b)


def test_bundle_errors_and_names(tmp_path):
    with pytest.raises(InputError, match="no such bundle folder"):
        load_bundle(tmp_path / "absent")
    model = create_model("shallow_cnn", channels=4, num_layers=1)
    save_bundle(tmp_path / "b", model, minimal_card("x"))
    (tmp_path / "b" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(InputError, match=r"model\.safetensors: weights do not match the card's weights_sha256"):
        load_bundle(tmp_path / "b")
    card = json.loads((tmp_path / "b" / "model.json").read_text())
    del card["weights_sha256"]  # optional: without it the file is only checked for being safetensors
    (tmp_path / "b" / "model.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match=r"model\.safetensors: unreadable weights"):
        load_bundle(tmp_path / "b")
    other = create_model("shallow_cnn", channels=8, num_layers=1)
    save_bundle(tmp_path / "c", other, minimal_card("y"))
    card = json.loads((tmp_path / "c" / "model.json").read_text())
    card["architecture"]["kwargs"]["channels"] = 4
    (tmp_path / "c" / "model.json").write_text(json.dumps(card))
    with pytest.raises(InputError, match="do not fit the card's architecture"):
        load_bundle(tmp_path / "c")
    assert "us-lesion-seg" in list_bundles()  # shipped in src/mammocad/bundles


def test_resume_continues_at_the_right_epoch_and_reproduces_the_weights(workdir, trained):
    cfg, full = trained
    run = workdir / "run_resumed"
    part = train(cfg, run, stop_after_epochs=1, progress=False)
    assert part.stopped == "interrupted" and part.epochs == 1 and part.bundle_dir is None
    assert json.loads((run / "checkpoint.json").read_text())["epoch"] == 1
    assert [r["epoch"] for r in read_log(run)] == ["1"]
    with pytest.raises(ConfigError, match="pass --resume"):
        train(cfg, run, progress=False)
    changed = cfg.model_copy(deep=True)
    changed.optim.lr = 0.01
    with pytest.raises(ConfigError, match=r"base\.yaml: optim: differs from the config of the checkpoint"):
        train(changed, run, resume=True, progress=False)
    rest = train(cfg, run, resume=True, progress=False)
    assert rest.stopped == "completed" and rest.epochs == 2 and [r["epoch"] for r in read_log(run)] == ["1", "2"]
    a = load_file(str(workdir / "run_full" / "checkpoint.safetensors"))
    b = load_file(str(run / "checkpoint.safetensors"))
    assert a.keys() == b.keys() and any(k.startswith("optim.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:3]
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING_COLUMNS} for r in rows]  # noqa: E731
    assert strip(read_log(run)) == strip(read_log(workdir / "run_full"))


def test_early_stopping_ends_training_after_patience_validations(workdir, capsys):
    # min_delta 1: only the first validation can improve a Dice in [0, 1]
    path = write_config(workdir, "early.yaml", train={"patience": 2, "min_delta": 1.0, "tensorboard": False})
    main(["train", str(path), "--out", str(workdir / "run_early"), "--epochs", "8"])
    rows = read_log(workdir / "run_early")
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    card = json.loads((workdir / "run_early" / "bundle" / "model.json").read_text())
    assert card["training"]["stopped"] == "early_stopping" and card["training"]["stages"][0]["best_epoch"] == 1
    assert "epoch 3/8" in capsys.readouterr().err  # the per-epoch progress line


def test_dilation10_stages_freeze_the_front_end(workdir):
    kwargs = {"width_mult": 0.0625, "fc_channels": 8, "fc_kernel": 3, "dropout": 0.0}
    path = write_config(workdir, "dil.yaml", model={"name": "dilation10", "kwargs": kwargs},
                        train={"tensorboard": False, "stages": [{"name": "front", "model_stage": "front", "epochs": 1},
                                                                {"name": "context", "model_stage": "context", "epochs": 1,
                                                                 "lr": 0.01}]})
    cfg = load_config(path)
    model = B.build_base_model(cfg)
    B.apply_stage(cfg, model, cfg.stage_list()[1])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("context.") for n in trainable)
    opt = B.build_optimizer(cfg.optim, model, 0.01)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(model.get_parameter(n)) for n in trainable}

    run = workdir / "run_dil"
    train(cfg, run, stop_after_epochs=1, progress=False)
    after_front = {k[len("model."):]: v for k, v in load_file(str(run / "checkpoint.safetensors")).items()
                   if k.startswith("model.")}
    result = train(cfg, run, resume=True, progress=False)
    assert result.stopped == "completed" and [r["stage"] for r in read_log(run)] == ["front", "context"]
    final, card = load_bundle(run / "bundle")
    assert card.architecture.kwargs["stage"] == "context"
    state = final.state_dict()
    front = [k for k in state if k.startswith(("features.", "fc.", "head."))]
    context = [k for k in state if k.startswith("context.")]
    assert front and context
    assert all(torch.equal(state[k], after_front[k]) for k in front)  # frozen in the context stage
    assert any(not torch.equal(state[k], after_front[k]) for k in context)  # trained in the context stage


def test_init_from_a_bundle_and_time_budget(workdir, trained):
    _, result = trained
    cfg = load_config(write_config(workdir, "init.yaml", model={"init_from": "run_full/bundle"}))
    assert cfg.model.init_from == str((workdir / "run_full" / "bundle").resolve())
    model = B.build_base_model(cfg)
    reference = result.model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())

    spent = train(load_config(write_config(workdir, "budget.yaml", train={"max_minutes": 1e-4, "tensorboard": False})),
                  workdir / "run_budget", progress=False)
    assert spent.stopped == "time_budget" and spent.epochs == 0 and spent.bundle_dir is None


# ---- fixed weights, devices, validation = evaluation ---------------------------------------------
def test_apply_stage_never_trains_fixed_weights(workdir, tmp_path):
    """FCN's fixed bilinear upsampling (and the x2 layers with learnable_upsample: false) must stay out
    of the optimizer, so neither gradients nor weight decay change it; parameters a model declares
    fixed stay frozen through every stage."""
    kwargs = {"width_mult": 0.0625, "fc_channels": 8, "fc_kernel": 3, "dropout": 0.0, "learnable_upsample": False}
    cfg = load_config(write_config(workdir, "fcn8_fixed.yaml", model={"name": "fcn8", "kwargs": kwargs},
                                   optim={"weight_decay": 0.5}))
    model = B.build_base_model(cfg)
    B.apply_stage(cfg, model, cfg.stage_list()[0])
    opt = B.build_optimizer(cfg.optim, model)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    names = {n for n, p in model.named_parameters() if id(p) in in_opt}
    assert names and not [n for n in names if "upscore" in n]
    before = {k: v.clone() for k, v in model.state_dict().items() if "upscore" in k}
    assert set(before) == {"upscore2.deconv.weight", "upscore_pool4.deconv.weight", "upscore8.deconv.weight"}
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    model.train()
    model(x).square().mean().backward()
    opt.step()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())
    # the kernels are in the state dict, so a bundle round-trips them through the card's architecture
    save_bundle(tmp_path / "fcn8", model.eval(), minimal_card("fcn8-fixed"))
    loaded, _ = load_bundle(tmp_path / "fcn8")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))

    declared = create_model("shallow_cnn", channels=4, num_layers=2)
    declared.fixed_parameters = ("head",)
    declared.head.requires_grad_(False)
    B.apply_stage(cfg, declared, cfg.stage_list()[0])  # starts by making every parameter trainable
    assert {n for n, p in declared.named_parameters() if not p.requires_grad} == {"head.weight", "head.bias"}


@pytest.mark.parametrize("where", ["training", "prediction"])
def test_training_and_prediction_resolve_devices_alike(where):
    from mammocad.inference.predictor import resolve_device

    resolve = pick_device if where == "training" else resolve_device
    assert resolve("cpu") == torch.device("cpu")
    assert resolve("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    for bad in ("gpu", "cuda:x", "cuda:-1", "cuda1", "cpu:cuda", ""):
        with pytest.raises(ConfigError, match=r"--device: must be auto, cpu, cuda or cuda:N"):
            resolve(bad)
    if not torch.cuda.is_available():  # cuda:N is well formed: refused only because there is no GPU
        for choice in ("cuda", "cuda:0", "cuda:1"):
            with pytest.raises(ConfigError, match=rf"--device: {choice} requested but no CUDA device is available"):
                resolve(choice)
    else:
        n = torch.cuda.device_count()
        assert resolve("cuda") == torch.device("cuda", 0) and resolve(f"CUDA:{n - 1}") == torch.device("cuda", n - 1)
        with pytest.raises(ConfigError, match=rf"cuda:{n} requested but this machine has {n} CUDA device"):
            resolve(f"cuda:{n}")


def test_validation_scores_what_evaluate_scores_for_the_bundle(workdir, trained):
    """Training-time validation (early stopping, the card's figures) goes through the bundle's own
    post-processing: same Dice as ``evaluate_prepared`` on the bundle the config produces. Model: the
    lesion probability is sigmoid(60 (pixel - 0.52)) (logreg on its intensity feature); on the val
    lesion image some tissue pixels pass 0.52, so min_area / max_lesions matter."""
    from mammocad.datasets.prepared import PreparedDataset
    from mammocad.evaluation.run import evaluate_prepared
    from mammocad.training.card import build_card
    from mammocad.tasks.segment import validate_images

    model = create_model("logreg", num_classes=1, scales=[1.0])
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.weight[0, 0] = 60.0
        model.classifier.bias.fill_(-60.0 * 0.52)
    plain = load_config(write_config(workdir, "val_plain.yaml"))
    post = load_config(write_config(workdir, "val_post.yaml", inference={"tile": 32, "overlap": 0.25, "batch_size": 4,
                                                                          "min_area": 10, "max_lesions": 1,
                                                                          "tta": ["hflip"]}))
    prepared = PreparedDataset(post.data.prepared)
    samples, labels = load_split(post, prepared, "val")
    scores = {}
    for cfg in (plain, post):
        val = validate_images(model, samples, labels, cfg.data.class_names, cfg.inference, amp_dtype=None)
        card = {**build_card(cfg, prepared, report=None, training={}), "architecture": model.mammocad_config}
        report = evaluate_prepared((model, card), cfg.data.prepared, split="val", autocast="fp32", n_boot=0,
                                   progress=False)
        assert report.n_images == len(samples) == 2
        for key, metric in report.headline.items():
            assert val.report.headline[key].value == pytest.approx(metric.value, abs=1e-12, nan_ok=True), key
        scores[cfg.source] = val.score
    # the post-processing changes the score, so validating without it (as before) would disagree
    assert scores[post.source] > scores[plain.source] + 0.1
    # end to end: the card's validation figures are what `mammocad evaluate` reports for the bundle
    _, result = trained
    card = json.loads((result.bundle_dir / "model.json").read_text())
    report = evaluate_prepared(result.bundle_dir, prepared.root, split="val", autocast="fp32", n_boot=0, progress=False)
    for key, metric in report.headline.items():
        assert card["validation"]["headline"][key]["value"] == pytest.approx(metric.value, abs=1e-12, nan_ok=True), key
