"""ONNX export: the graph (network + sigmoid + 3x3 peaks + top-K) against PyTorch's Detector, the
parity matcher on hand-made cases, and `centernet-ray export` run as a user runs it."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from centernet_ray.checkpoint import LoadedModel, model_from_checkpoint
from centernet_ray.config import load_config
from centernet_ray.detector import Detections, Detector, letterbox_batch
from centernet_ray.export import OnnxDetector, export_onnx
from centernet_ray.export.check import BOX_ATOL, SCORE_ATOL, check_export, failure_reason, match_detections
from centernet_ray.model import build_model

pytest.importorskip("onnxruntime")


def _detections(rows):
    """rows: (score, class, x1, y1, x2, y2), highest score first."""
    array = np.array(rows, dtype=np.float64).reshape(-1, 6)
    return Detections(array[:, 2:], array[:, 0], array[:, 1].astype(np.int64))


def test_matcher_pairs_twins_within_tolerance_and_ignores_ties_at_the_kth_score():
    ours = _detections([(0.9, 0, 1, 1, 5, 5), (0.5, 1, 2, 2, 6, 6), (0.2, 0, 0, 0, 1, 1), (0.2, 1, 7, 7, 9, 9)])
    # the same, re-ordered, within 1e-6; the tie at the K-th score (0.2) kept another box
    theirs = _detections([(0.5 + 1e-6, 1, 2, 2, 6, 6 + 1e-3), (0.9, 0, 1, 1, 5, 5), (0.2, 0, 3, 3, 4, 4),
                          (0.2, 1, 7, 7, 9, 9)])
    pairs, score_diff, box_diff, unmatched = match_detections(ours, theirs)
    assert (pairs, unmatched) == (2, 0)
    assert score_diff == pytest.approx(1e-6, abs=1e-9) and box_diff == pytest.approx(1e-3, abs=1e-9)


# (pairs, unmatched): a changed detection has no twin on either side (2 unmatched, the 0.9 one pairs);
# an extra one only on the side that has it (1); the 0.1 one sits at the tie boundary, not compared
@pytest.mark.parametrize("change, expected", [("score", (1, 2)), ("box", (1, 2)), ("class", (1, 2)),
                                              ("extra", (2, 1))])
def test_matcher_counts_a_detection_without_twin(change, expected):
    rows = [(0.9, 0, 1, 1, 5, 5), (0.5, 1, 2, 2, 6, 6), (0.1, 0, 0, 0, 1, 1)]
    other = [list(r) for r in rows]
    if change == "score":
        other[1][0] += 2 * SCORE_ATOL
    elif change == "box":
        other[1][4] += 2 * BOX_ATOL
    elif change == "class":
        other[1][1] = 2
    else:  # the other runtime found one more confident detection
        other.insert(1, (0.7, 3, 4, 4, 8, 8))
    pairs, _, _, unmatched = match_detections(_detections(rows), _detections(other))
    assert (pairs, unmatched) == expected


def test_a_check_that_compared_nothing_or_read_no_image_fails():
    flat = _detections([(0.1, 0, 1, 1, 5, 5)] * 5)  # every score tied at the K-th: none above the boundary
    moved = _detections([(0.1, 2, 500, 500, 505, 505)] * 5)
    pairs, _, _, unmatched = match_detections(flat, moved)
    assert (pairs, unmatched) == (0, 0)
    assert "nothing was compared" in failure_reason(12, 0, pairs, unmatched, 0.0, 0.0)
    assert failure_reason(0, 3, 0, 0, 0.0, 0.0) == "no readable validation image (3 skipped)"
    assert failure_reason(12, 0, 40, 0, 0.5, 0.503) == ""
    assert "no ONNX twin" in failure_reason(12, 0, 40, 2, 0.5, 0.5)
    # one detection without a twin is a rounding flip, however few were compared (the job test's
    # one-epoch model: 1 of 986); beyond one, at most 0.1%
    assert failure_reason(12, 0, 985, 1, 0.5, 0.5) == "" and failure_reason(12, 0, 40, 1, 0.5, 0.5) == ""
    assert failure_reason(12, 0, 2997, 3, 0.5, 0.5) == "" and "4 of 3001" in failure_reason(12, 0, 2997, 4, 0.5, 0.5)
    assert "differs from PyTorch" in failure_reason(12, 0, 40, 0, 0.5, 0.51)


def _spread(model):
    """Untrained heads score every pixel alike (3x3 peaks then tie within rounding): spread the scores
    as a trained model's are, and make deformable convolutions deform (their offsets start at 0)."""
    with torch.no_grad():
        model.heatmap[-1].weight.mul_(5)
        for module in model.modules():
            if hasattr(module, "offset_mask"):
                module.offset_mask.weight.normal_(0, 0.05)
    return model


def _loaded(overrides, classes=4, size=64, seed=0):
    torch.manual_seed(seed)
    config = load_config(None, [f"data.input_size=[{size},{size}]", "model.pretrained=null", *overrides])
    model = _spread(build_model(config.model, classes).eval())
    names = [f"class{i}" for i in range(classes)]
    return LoadedModel(model, config, names, list(range(1, classes + 1)), 3, {})


def _random_images(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (3, int(h), int(w)), dtype=torch.uint8, generator=generator)
            for h, w in torch.randint(48, 200, (count, 2), generator=generator)]


def _assert_parity(loaded, path, images):
    ours = Detector(loaded.model, loaded.config.data.input_size).detect_images(images, k=100)
    theirs = OnnxDetector(path).detect_images(images, k=100)
    for a, b in zip(ours, theirs):
        pairs, score_diff, box_diff, unmatched = match_detections(a, b)
        assert unmatched == 0 and pairs >= 20, (pairs, unmatched)  # every 3x3 peak of the image, up to K
        assert score_diff <= SCORE_ATOL and box_diff <= BOX_ATOL


@pytest.mark.integration  # the exporter takes 5-10 s a model
def test_exported_graph_is_the_detector_for_any_batch_size_and_carries_its_metadata(tmp_path):
    loaded = _loaded(["model.width=0.25", "model.lateral=true", "model.neck_channels=[32,32,32]", "model.head_conv=16"])
    path = export_onnx(loaded, tmp_path / "model.onnx", k=100, version="ckpt@epoch3")
    onnx_detector = OnnxDetector(path)
    assert onnx_detector.input_size == (64, 64) and onnx_detector.class_names == loaded.class_names
    assert onnx_detector.category_ids == [1, 2, 3, 4] and onnx_detector.version == "ckpt@epoch3"
    for count in (1, 3, 8):  # a dynamic batch dimension
        batch = letterbox_batch(_random_images(count, seed=count), (64, 64))
        boxes, scores, classes = onnx_detector.run(batch.images)
        assert boxes.shape == (count, 100, 4) and scores.shape == classes.shape == (count, 100)
        assert np.all(np.diff(scores, axis=1) <= 0) and classes.dtype == np.int64
    _assert_parity(loaded, path, _random_images(6))


@pytest.mark.integration  # the exporter takes 5-10 s a model
def test_the_check_skips_unreadable_images_and_fails_a_changed_graph_with_the_reason(tmp_path, shapes_dataset):
    import shutil

    loaded = _loaded(["model.neck_channels=[32,32,32]", "model.head_conv=16"])
    path = export_onnx(loaded, tmp_path / "model.onnx", k=100)
    images = tmp_path / "val"
    shutil.copytree(shapes_dataset / "images" / "val", images)
    annotations = str(shapes_dataset / "annotations" / "instances_val.json")
    first, second = sorted(images.iterdir())[:2]
    first.write_bytes(first.read_bytes()[:40])  # truncated
    second.unlink()  # missing
    check = check_export(loaded, path, images=str(images), annotations=annotations)
    assert check.passed and (check.images, check.skipped_images) == (10, 2) and check.matched_detections > 0
    with torch.no_grad():  # the PyTorch side now differs from what was exported
        loaded.model.size[-1].bias += 1.0
    check = check_export(loaded, path, images=str(shapes_dataset / "images" / "val"), annotations=annotations)
    assert not check.passed and "no ONNX twin" in check.reason and check.unmatched > 0 and check.images == 12


@pytest.mark.heavy_model
@pytest.mark.parametrize("name", ["coco_resnet18", "coco_dla34_1x"])
def test_official_models_at_512_export_and_match_pytorch(tmp_path, name):
    """The zoo's plain-conv models at the official 512x512 (random weights, 80 classes)."""
    loaded = _loaded(["model.deformable=false"] if "dla" in name else [], classes=80, size=512)
    loaded.config = load_config(name, ["model.pretrained=null", "model.deformable=false"])
    loaded.model = _spread(build_model(loaded.config.model, 80).eval())
    assert loaded.config.data.input_size == (512, 512)
    path = export_onnx(loaded, tmp_path / "model.onnx")
    _assert_parity(loaded, path, _random_images(2))


@pytest.mark.integration  # the exporter takes 5-10 s a model
def test_deformable_models_export_through_onnx_deformconv(tmp_path):
    """ONNX's DeformConv computes torchvision's deform_conv2d: the raw heads of a ResDCN whose
    offsets are far from zero agree within 1e-5. (Its decoded detections are not compared here: an
    untrained quarter-width model scores all pixels within ~1e-2, where rounding flips 3x3 peaks.)"""
    import onnxruntime

    loaded = _loaded(["model.backbone=resdcn18", "model.width=0.25", "model.neck_channels=[32,32,32]",
                      "model.head_conv=16"])
    path = export_onnx(loaded, tmp_path / "model.onnx")
    import onnx

    assert "DeformConv" in {node.op_type for node in onnx.load(str(path)).graph.node}
    OnnxDetector(path).detect_images(_random_images(2))  # onnxruntime runs the whole graph

    class Heads(torch.nn.Module):
        def forward(self, x):
            out = loaded.model(x)
            return out["heatmap"], out["size"], out["offset"]

    images = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    torch.onnx.export(Heads().eval(), (images,), str(tmp_path / "heads.onnx"), input_names=["x"], opset_version=19,
                      dynamo=True, external_data=False, verbose=False)
    got = onnxruntime.InferenceSession(str(tmp_path / "heads.onnx")).run(None, {"x": images.numpy()})
    with torch.no_grad():
        want = Heads()(images)
    for ours, theirs in zip(want, got):
        np.testing.assert_allclose(theirs, ours.numpy(), atol=1e-5, rtol=0)


@pytest.mark.integration  # the exporter takes 5-10 s a model
def test_export_command_on_a_trained_checkpoint_logs_parity_and_ap_to_mlflow(tmp_path, trained_checkpoint):
    """`centernet-ray export` as a user runs it, checked on the demo's validation set (the synthetic
    generator's 200 val images at 128 px, seed 0) and on the images the model learned."""
    from centernet_ray.data.synthetic import write_shapes_dataset
    from mlflow import MlflowClient

    checkpoint, dataset = trained_checkpoint
    demo_val = write_shapes_dataset(tmp_path / "demo_val", num_train=1, num_val=200, image_size=128, seed=0)
    sets = {"demo_val": (demo_val / "images" / "val", demo_val / "annotations" / "instances_val.json"),
            "learned": (dataset / "images" / "train", dataset / "annotations" / "instances_train.json")}
    # The two commands run side by side (each is one process, mostly one core), each logging to a store
    # of its own: two processes creating one new SQLite store at once would race on its tables.
    commands = {}
    for name, (images, annotations) in sets.items():
        # the second as URIs, as a bucket is named (s3://): written here, then copied there
        where = (str(tmp_path / name), str(images), str(annotations)) if name == "demo_val" else tuple(
            f"file://{path}" for path in (tmp_path / name, images, annotations))
        with open(tmp_path / f"{name}.log", "w") as log:
            process = subprocess.Popen([sys.executable, "-m", "centernet_ray", "export", "--checkpoint", str(checkpoint),
                                        "--output", where[0], "--images", where[1], "--annotations", where[2],
                                        "--tracking-uri", f"sqlite:///{tmp_path / f'{name}.db'}"],
                                       cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT)
        commands[name] = (process, where[0])
    reports = {}
    for name, (process, output) in commands.items():
        process.wait(timeout=600)
        stdout = (tmp_path / f"{name}.log").read_text()
        assert process.returncode == 0, stdout
        assert "check: passed" in stdout and f"wrote {output}/model.onnx" in stdout
        exported = json.loads((tmp_path / name / "export.json").read_text())
        assert exported["onnx"] == f"{output}/model.onnx" and (tmp_path / name / "model.onnx").stat().st_size > 1e6
        reports[name] = exported["check"]
    assert reports["demo_val"]["images"] == 200 and reports["learned"]["images"] == 8
    assert reports["learned"]["torch_ap"] > 0.5  # the model found these images' objects: a meaningful AP
    for report in reports.values():
        assert abs(report["onnx_ap"] - report["torch_ap"]) <= 0.005 and report["unmatched"] == 0
        assert report["max_score_diff"] <= SCORE_ATOL and report["max_box_diff"] <= BOX_ATOL
    for name in sets:  # one export run per command, with the graph and the check's report
        client = MlflowClient(f"sqlite:///{tmp_path / f'{name}.db'}")
        runs = client.search_runs([client.get_experiment_by_name("centernet-ray").experiment_id])
        assert [r.info.run_name for r in runs] == ["export"], runs
        assert {a.path for a in client.list_artifacts(runs[0].info.run_id, "onnx")} == {"onnx/model.onnx", "onnx/export.json"}
        assert runs[0].data.metrics["export/passed"] == 1.0 and "export/onnx_AP" in runs[0].data.metrics


def test_an_export_to_log_to_a_server_that_does_not_answer_is_refused_before_exporting(tmp_path):
    """Before, the export and its check ran, then MLflow's client retried for ~4 minutes."""
    import socket

    from centernet_ray.checkpoint import checkpoint_state, save_checkpoint
    from centernet_ray.errors import UserInputError
    from centernet_ray.export.job import run_export

    loaded = _loaded(["model.neck_channels=[32,32,32]", "model.head_conv=16"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        server = f"http://127.0.0.1:{probe.getsockname()[1]}"
    save_checkpoint(tmp_path / "checkpoint.pt", checkpoint_state(loaded.model, loaded.config, loaded.class_names,
                                                                 loaded.category_ids, 3))
    with pytest.raises(UserInputError, match="does not answer"):
        run_export(str(tmp_path / "checkpoint.pt"), tmp_path / "out", tracking_uri=server)
    assert not (tmp_path / "out").exists()
