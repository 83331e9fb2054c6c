"""The whole toolchain end to end on the committed fixture images (about 2 minutes).

train -> ONNX -> int8 TFLite -> features through device/ -> mRMR -> SVM -> bundle,
then device/ loads the bundle and classifies.
"""

import json

import numpy as np
import pytest

from convert import cli
from convert.data import load_rgb, load_sources, read_split
from device.bundle import load_bundle
from device.classifier import Classifier
from device.head import evaluate_many
from device.preprocess import load_image
from device.quality import assess
from device.reference import check_references

ARGS = ["--width", "0.125", "--size", "64", "--low-size", "64", "--low-epochs", "2", "--high-epochs", "0",
        "--tune-epochs", "1", "--batch", "8", "--block", "2", "--test-fraction", "0.25", "--val-fraction", "0.25",
        "--calib", "24", "--folds", "3"]


@pytest.fixture(scope="module")
def built(tmp_path_factory, smear_dir):
    tmp = tmp_path_factory.mktemp("chain")
    argv = ["all", "--data", str(smear_dir), "--work", str(tmp / "work"), "--models", str(tmp / "models"), *ARGS]
    assert cli.main(argv) == 0
    return tmp, argv


@pytest.mark.slow
def test_chain_builds_a_bundle_the_device_accepts(built, smear_dir):
    tmp, _ = built
    bundle = load_bundle(tmp / "models")
    manifest = json.loads((tmp / "models" / "manifest.json").read_text())
    assert bundle.classes == ("Benign", "Early Pre-B", "Pre-B", "Pro-B")
    assert manifest["input"]["dtype"] == "int8" and manifest["output"]["features"] == 1000
    assert manifest["quantization"]["calibration_images"] == 16  # the whole (tiny) training split
    assert manifest["quantization"]["activation_range"] == "min/max"  # percentile ranges only when asked for
    assert "LEAKY_RELU" in manifest["quantization"]["op_types"]  # the CPU graph: native LeakyReLU
    assert "LEAKY_RELU" not in manifest["quantization"]["edgetpu_friendly_op_types"]  # the Edge TPU's input
    assert bundle.edgetpu_friendly_path is not None and bundle.edgetpu_friendly_path.is_file()
    assert (manifest["split"]["train"], manifest["split"]["val"], manifest["split"]["test"]) == (16, 8, 8)
    for key in ("accuracy", "int8_float_agreement", "all_sensitivity", "benign_specificity"):
        assert 0.0 <= manifest["metrics"][key] <= 1.0
    assert manifest["head"]["ood_method"] in ("knn", "mahalanobis", "energy")
    th = manifest["thresholds"]
    assert 0.5 <= th["confidence"] <= th["benign_confidence"] <= 0.99
    assert manifest["input"]["field_px"] == 224 and manifest["input"]["rbc_diameter_px"] > 5
    report = (tmp / "models" / "REPORT.md").read_text()
    for words in ("Table 2", "Shift suite", "scale-bar", "Wilson", "Refer what it does not know", "Slide verdict",
                  "one-standard-error", "errors per block", "range: the minimum to maximum seen"):
        assert words in report
    metrics = json.loads((tmp / "models" / "metrics.json").read_text())
    assert sum(r["n"] for r in metrics["test_blocks"]) == metrics["test"]["n"]
    assert metrics["int8_float_decision_agreement"]["n"] == metrics["test"]["n"]  # every test field, one definition
    assert sum(r["wrong"] for r in metrics["test_blocks"]) == metrics["test"]["n"] - metrics["test"]["accuracy"]["k"]
    families = {r["family"] for r in metrics["shifts"]}
    assert {"hue", "defocus", "JPEG", "magnification", "eyepiece frame", "sensor noise"} <= families
    assert any(r["mode"] == "calibrated" for r in metrics["shifts"])
    assert any(k.startswith("synthetic:") for k in metrics["ood"])
    clf = Classifier.open(bundle, num_threads=1)
    img = next((smear_dir / "Pre").iterdir())
    v = clf.classify(np.asarray(load_image(img))).verdict
    assert v.status in ("ok", "refer") and abs(sum(v.scores.values()) - 1) < 1e-6
    # two reference images per class, with the expected int8 outputs this machine reproduces exactly
    assert bundle.references is not None and sorted(bundle.references.classes) == sorted(bundle.classes * 2)
    assert set(bundle.references.sources) <= {p.name for p in smear_dir.rglob("*")}
    check = check_references(bundle, clf)
    assert check.ok and check.max_lsb_diff == 0 and not check.mismatches


@pytest.mark.slow
def test_head_was_fitted_on_exactly_what_the_device_computes(built):
    tmp, _ = built
    work = tmp / "work"
    z = np.load(work / "features.npz")
    classes, parts, doc = read_split(work / "split.json")
    clf = Classifier.open(load_bundle(tmp / "models"), num_threads=1)
    from pathlib import Path

    rgb = load_rgb(Path(doc["data_root"]), parts["test"][:3], 64)
    for i, src in enumerate(load_sources(Path(doc["data_root"]), parts["test"][:3])):
        np.testing.assert_array_equal(clf.features(rgb[i]), z["test"][i])
        # and the device's camera path (any frame -> prepared square) gives the same pixels
        np.testing.assert_array_equal(clf.prepare(src).rgb, rgb[i])
        # the gate's code is kept beside each split's features: the report counts the retakes it makes
        assert z["test_q"][i] == assess(src).code
    assert {f"{p}_q" for p in ("train", "val", "test")} <= set(z.files)


def test_the_head_carries_the_networks_own_classifier_in_the_heads_class_order(built):
    from convert.export import load_trained

    tmp, _ = built
    head = load_bundle(tmp / "models").head
    net, state = load_trained(tmp / "work" / "darknet19.pt")
    np.testing.assert_allclose(head.network_coef, net.classifier.weight.detach().double().numpy())
    np.testing.assert_allclose(head.network_intercept, net.classifier.bias.detach().double().numpy())
    z = np.load(tmp / "work" / "features.npz")
    logits = z["test"].astype(np.float64) @ head.network_coef.T + head.network_intercept
    outs = evaluate_many(head, z["test"])
    assert [o.network_index for o in outs] == logits.argmax(1).tolist()
    metrics = json.loads((tmp / "models" / "metrics.json").read_text())
    assert set(metrics["network_check"]) >= {"validation", "new-patient test"}  # what the report says it referred


@pytest.mark.slow
def test_second_run_skips_current_steps(built, capsys):
    tmp, argv = built
    before = {p.name: p.stat().st_mtime_ns for p in (tmp / "work").iterdir() if p.is_file()}
    assert cli.main([*argv[:1], *argv[1:]]) == 0
    after = {p.name: p.stat().st_mtime_ns for p in (tmp / "work").iterdir() if p.is_file()}
    for name in ("darknet19.pt", "darknet19.onnx", "darknet19_int8.tflite", "features.npz", "head.npz"):
        assert before[name] == after[name], f"{name} was rebuilt although current"


@pytest.mark.slow
def test_evaluate_prints_the_test_errors_by_block(built, capsys):
    tmp, _ = built
    capsys.readouterr()
    assert cli.main(["evaluate", "--work", str(tmp / "work")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("top-class errors by block"))
    cells = [c.rsplit(" ", 2) for c in line.split(": ", 1)[1].split("; ")]
    # 8 test images, 2 per class, in blocks of 2: one block per class, the newest numbers
    assert sorted(c[0] for c in cells) == ["Benign", "Early Pre-B", "Pre-B", "Pro-B"]
    wrong_n = [tuple(map(int, c[2].split("/"))) for c in cells]
    assert all(n == 2 and 0 <= w <= n for w, n in wrong_n)
    # the blocks' errors are the top-class errors the accuracy on the line above counts
    acc = next(x for x in out.splitlines() if x.startswith("new-patient test"))
    accuracy = float(acc.split("accuracy")[1].split("%")[0])
    assert sum(w for w, _ in wrong_n) == round(8 * (1 - accuracy / 100))


def test_missing_data_folder_is_a_clear_error(tmp_path, capsys):
    rc = cli.main(["split", "--data", str(tmp_path / "absent"), "--work", str(tmp_path / "w")])
    assert rc == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.slow
def test_committed_weights_are_reused_instead_of_retraining(built, smear_dir, capsys):
    tmp, argv = built
    work = tmp / "fresh-work"
    base = ["--data", str(smear_dir), "--work", str(work), "--models", str(tmp / "models"), *ARGS]
    assert cli.main(["split", *base]) == 0
    assert cli.main(["train", *base]) == 0
    assert "reusing the committed weights" in capsys.readouterr().out
    assert not (work / "train").exists()  # no epoch was run
    from convert.options import Options
    from convert.steps import reuse_committed_weights

    o = Options(data=smear_dir, work=work, models=tmp / "models")
    cfg = json.loads((work / "stamps" / "train.json").read_text())
    assert cfg.get("reused") is True
    import torch

    state = torch.load(tmp / "models" / "source" / "darknet19-fp16.pt", weights_only=False)
    params = state["config"]
    assert not reuse_committed_weights(o, {**params, "low_epochs": params["low_epochs"] + 1})
    # the weights carry the history of the run that trained them, so a build that reuses them still reports it
    from convert.report import training_history, training_text

    assert state["history"] == json.loads((tmp / "work" / "train" / "history.json").read_text())
    hist, reused = training_history(o)
    assert reused and hist == state["history"]
    line = training_text(params, hist, reused=True)
    assert "This build reused the committed weights" in line and "kept epoch" in line
    assert training_text(params, [], reused=True).endswith("those of the run that trained them.")
    assert training_history(Options(data=smear_dir, work=tmp / "work", models=tmp / "models")) == (
        state["history"], False)  # the build that trained: its own work folder's history


@pytest.mark.slow
def test_weights_of_the_recipe_before_the_tune_stage_start_the_tune_stage(built, smear_dir, capsys):
    """Committed weights whose config is this recipe's first cycle: only the tune stage runs, and they are a
    candidate for the kept epoch (written to the history as the given epoch)."""
    import shutil

    import torch

    from convert.report import training_text

    tmp, _ = built
    models = tmp / "models-first-cycle"
    shutil.copytree(tmp / "models", models)
    w = models / "source" / "darknet19-fp16.pt"
    state = torch.load(w, weights_only=False)
    state["config"] = {k: v for k, v in state["config"].items() if not k.startswith("tune_")}
    torch.save(state, w)
    work = tmp / "tune-work"
    base = ["--data", str(smear_dir), "--work", str(work), "--models", str(models), *ARGS]
    assert cli.main(["split", *base]) == 0
    capsys.readouterr()
    assert cli.main(["train", *base]) == 0
    assert "are this recipe's first cycle; training the 1-epoch tune stage" in capsys.readouterr().out
    hist = json.loads((work / "train" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [2, 3] and hist[0]["given"] and "val_bacc" in hist[1]
    report_line = training_text({**state["config"], "tune_epochs": 1, "tune_lr": 0.004}, hist)
    assert "took the first cycle from the committed weights" in report_line and "kept epoch" in report_line
