import json
import os
import shutil
import time

import pyarrow.parquet as pq
import pytest

from centernet_ray.ray_data.ingest import ingest_coco as ingest_with_or_without_ray, read_manifest


def ingest_coco(*args, **kwargs):
    """Here, without Ray, whatever ran before in the session (the Ray path is test_jobs_integration.py's)."""
    return ingest_with_or_without_ray(*args, use_ray=False, **kwargs)


def broken_copy(shapes_dataset, tmp_path):
    """The val split with one corrupt image, one missing file and broken annotations injected."""
    root = tmp_path / "broken"
    shutil.copytree(shapes_dataset / "images" / "val", root / "images")
    instances = json.loads((shapes_dataset / "annotations" / "instances_val.json").read_text())
    (root / "images" / instances["images"][0]["file_name"]).write_bytes(b"garbage, not a jpeg")
    (root / "images" / instances["images"][1]["file_name"]).unlink()
    extra = [
        {"id": 9001, "image_id": instances["images"][2]["id"], "category_id": 1, "bbox": [float("nan"), 1, 2, 2], "iscrowd": 0},
        {"id": 9002, "image_id": instances["images"][2]["id"], "category_id": 1, "bbox": [5, 5, -3, 4], "iscrowd": 0},
        {"id": 9003, "image_id": instances["images"][2]["id"], "category_id": 77, "bbox": [5, 5, 3, 4], "iscrowd": 0},
        {"id": 9004, "image_id": instances["images"][2]["id"], "category_id": 2, "bbox": [5, 5, 30, 40], "iscrowd": 1},
    ]
    instances["annotations"] += extra
    (root / "instances.json").write_text(json.dumps(instances).replace("NaN", "NaN"))
    return root, instances


def test_ingest_writes_shards_with_one_row_per_image(shapes_dataset, tmp_path):
    result = ingest_coco(str(shapes_dataset / "images" / "train"), str(shapes_dataset / "annotations" / "instances_train.json"),
                         str(tmp_path / "pq"), shard_size=10)
    assert result.rows == 24 and len(result.shards) == 3
    generation = result.shards[0].split("-")[1]  # the ingest's: no shard of an earlier one is overwritten
    assert result.shards == [f"part-{generation}-{index:05d}.parquet" for index in range(3)]
    table = pq.read_table(tmp_path / "pq")
    assert table.num_rows == 24
    assert set(table.column_names) == {"image_id", "file_name", "width", "height", "image", "boxes", "labels"}
    row = table.slice(0, 1).to_pylist()[0]
    assert len(row["boxes"]) == 4 * len(row["labels"]) and row["image"][:2] == b"\xff\xd8"
    assert result.class_names == ["circle", "rectangle", "triangle", "cross"]


def test_ingest_is_idempotent_and_reads_file_uris(shapes_dataset, tmp_path):
    args = (str(shapes_dataset / "images" / "val"), str(shapes_dataset / "annotations" / "instances_val.json"))
    first = ingest_coco(*args, str(tmp_path / "pq"))
    stamp = (tmp_path / "pq" / first.shards[0]).stat().st_mtime_ns
    again = ingest_coco(f"file://{args[0]}", f"file://{args[1]}", f"file://{tmp_path / 'pq'}")
    assert again.reused and again.rows == first.rows  # the same input spelled as URIs: not read again
    third = ingest_coco(*args, str(tmp_path / "pq"))
    assert third.reused and (tmp_path / "pq" / first.shards[0]).stat().st_mtime_ns == stamp
    by_uri = ingest_coco(f"file://{args[0]}", f"file://{args[1]}", f"file://{tmp_path / 'fresh'}")  # read through URIs
    assert not by_uri.reused and pq.read_table(tmp_path / "fresh").equals(pq.read_table(tmp_path / "pq"))


def test_images_fixed_in_place_after_the_report_are_ingested_by_the_rerun(shapes_dataset, tmp_path, caplog):
    """The ingest reports an unreadable and a missing image; the user mends both and reruns: the
    rerun reads them (it used to find the same annotation file and reuse the shards without them)."""
    root, instances = broken_copy(shapes_dataset, tmp_path)
    args = (str(root / "images"), str(root / "instances.json"), str(tmp_path / "pq"))
    first = ingest_coco(*args)
    assert first.report["unreadable_images"] == 1 and first.report["missing_images"] == 1 and first.rows == 10
    assert ingest_coco(*args).reused  # nothing changed: nothing is read again
    for image in instances["images"][:2]:
        shutil.copy(shapes_dataset / "images" / "val" / image["file_name"], root / "images" / image["file_name"])
    caplog.clear()
    with caplog.at_level("INFO", logger="centernet_ray.ray_data.ingest"):
        mended = ingest_coco(*args)
    assert not mended.reused and mended.rows == 12 and pq.read_table(tmp_path / "pq").num_rows == 12
    assert mended.report["unreadable_images"] == 0 and mended.report["missing_images"] == 0
    assert "holds an earlier ingest, and the image files changed since: ingesting again" in caplog.text
    assert mended.annotations_sha256 == first.annotations_sha256 and mended.fingerprint != first.fingerprint
    assert ingest_coco(*args).reused


def test_the_same_images_with_other_modification_times_are_the_same_input(shapes_dataset, tmp_path):
    """As the copies of a dataset on several nodes, or the synthetic shapes each node generates: the
    shards are reused, not written again by every trial's driver."""
    images = tmp_path / "images"
    shutil.copytree(shapes_dataset / "images" / "val", images)
    args = (str(images), str(shapes_dataset / "annotations" / "instances_val.json"), str(tmp_path / "pq"))
    first = ingest_coco(*args)
    for image in images.iterdir():
        os.utime(image, (time.time() + 100, time.time() + 100))
    again = ingest_coco(*args)
    assert again.reused and again.fingerprint == first.fingerprint


def test_a_sweeps_trial_trains_on_the_sweeps_ingest_when_the_images_changed_meanwhile(shapes_dataset, tmp_path, caplog):
    """Images mended while a sweep runs: a trial that ingested again would delete the shards the
    other trials read. It warns and reuses them; an annotation file changed meanwhile is refused,
    saying so (it was refused by the sweep's own reader mark, as if another command read it)."""
    from centernet_ray.errors import UserInputError

    root, instances = broken_copy(shapes_dataset, tmp_path)
    args = (str(root / "images"), str(root / "instances.json"), str(tmp_path / "pq"))
    first = ingest_coco(*args)
    for image in instances["images"][:2]:
        shutil.copy(shapes_dataset / "images" / "val" / image["file_name"], root / "images" / image["file_name"])
    trial = ingest_coco(*args, images_changed_ok=True)
    assert trial.reused and trial.rows == first.rows == 10 and trial.fingerprint == first.fingerprint
    assert "changed since" in caplog.text and "this trial trains on it as it is" in caplog.text
    (root / "instances.json").write_text(json.dumps({**instances, "annotations": instances["annotations"][:-1]}))
    with pytest.raises(UserInputError, match=r".*instances.json changed since this trial's sweep ingested it into "
                                             r".*pq, which the sweep's other trials read: let the sweep end"):
        ingest_coco(*args, images_changed_ok=True)
    assert read_manifest(args[2])["fingerprint"] == first.fingerprint


@pytest.mark.parametrize("inside", ["parquet", "."])
def test_shards_written_among_the_images_are_not_taken_for_changed_images(shapes_dataset, tmp_path, inside):
    images = tmp_path / "images"
    shutil.copytree(shapes_dataset / "images" / "val", images)
    args = (str(images), str(shapes_dataset / "annotations" / "instances_val.json"), str(images / inside))
    assert not ingest_coco(*args).reused
    assert ingest_coco(*args).reused


def test_files_the_annotations_do_not_name_change_nothing_and_annotated_ones_still_do(shapes_dataset, tmp_path, caplog):
    """A ``.DS_Store``, notes, predictions written beside the images, another split's images in the
    same folder: the shards are reused (they used to be written again, for the whole dataset)."""
    images = tmp_path / "images"
    shutil.copytree(shapes_dataset / "images" / "val", images)
    instances = json.loads((shapes_dataset / "annotations" / "instances_val.json").read_text())
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps({**instances, "images": instances["images"][:8]}))  # 4 files it does not name
    args = (str(images), str(annotations), str(tmp_path / "pq"))
    first = ingest_coco(*args)
    assert first.rows == 8 and json.loads((tmp_path / "pq" / "_annotated_files.json").read_text()) == {
        "annotations_sha256": first.annotations_sha256,
        "files": sorted(image["file_name"] for image in instances["images"][:8])}
    (images / ".DS_Store").write_bytes(b"\0" * 6148)
    (images / "notes.txt").write_text("relabelled the circles")
    (images / "predictions").mkdir()
    (images / "predictions" / "detections.json").write_text("[]")
    (images / instances["images"][10]["file_name"]).write_bytes(b"another split's image, now corrupt")
    again = ingest_coco(*args)
    assert again.reused and again.fingerprint == first.fingerprint
    (images / instances["images"][3]["file_name"]).write_bytes(b"an annotated image, now corrupt")
    caplog.clear()
    with caplog.at_level("INFO", logger="centernet_ray.ray_data.ingest"):
        changed = ingest_coco(*args)
    assert not changed.reused and changed.rows == 7 and "the image files changed since" in caplog.text
    (images / instances["images"][3]["file_name"]).unlink()
    assert not ingest_coco(*args).reused  # an annotated file removed
    annotations.write_text(json.dumps({**instances, "images": instances["images"][:7]}))
    caplog.clear()
    with caplog.at_level("INFO", logger="centernet_ray.ray_data.ingest"):
        ingest_coco(*args)
    assert "an earlier ingest, and the annotation file changed since" in caplog.text  # not "the image files" too


def test_a_record_of_the_files_of_another_annotation_file_is_not_taken_for_the_manifest_s(
        shapes_dataset, tmp_path, monkeypatch):
    """Annotations naming an image not there yet, ingested and stopped at the manifest (the earlier
    ingest stays whole); the image added; the same annotations again: ingested, with the image. A
    record of the files beside a manifest of another annotation file (what a write stopped between
    the two left, before the record carried its file's sha256) hid the image from every ingest."""
    from centernet_ray import storage

    images = tmp_path / "images"
    shutil.copytree(shapes_dataset / "images" / "val", images)
    instances = json.loads((shapes_dataset / "annotations" / "instances_val.json").read_text())
    later = instances["images"][11]["file_name"]
    shutil.move(images / later, tmp_path / later)
    annotations = tmp_path / "instances.json"
    annotations.write_text(json.dumps({**instances, "images": instances["images"][:11]}))  # the files there
    args = (str(images), str(annotations), str(tmp_path / "pq"))
    earlier = ingest_coco(*args)
    record = tmp_path / "pq" / "_annotated_files.json"
    earlier_record = json.loads(record.read_text())
    annotations.write_text(json.dumps(instances))  # names the image not there yet

    def stopped_at_the_manifest(uri, data):
        if str(uri).endswith("_manifest.json"):
            raise KeyboardInterrupt
        write_whole(uri, data)

    write_whole = storage.write_whole
    with monkeypatch.context() as stopping:
        stopping.setattr(storage, "write_whole", stopped_at_the_manifest)
        with pytest.raises(KeyboardInterrupt):
            ingest_coco(*args)
    assert read_manifest(args[2])["fingerprint"] == earlier.fingerprint  # the earlier ingest, whole
    assert ingest_coco(*args).rows == 11 and json.loads(record.read_text()) != earlier_record
    record.write_text(json.dumps(earlier_record))  # beside the manifest of the other annotation file
    shutil.move(tmp_path / later, images / later)
    assert ingest_coco(*args).rows == 12


def test_an_ingest_by_the_version_that_listed_every_file_is_still_reused(shapes_dataset, tmp_path, monkeypatch):
    from centernet_ray.data import ingest_input

    images = tmp_path / "images"
    shutil.copytree(shapes_dataset / "images" / "val", images)
    args = (str(images), str(shapes_dataset / "annotations" / "instances_val.json"), str(tmp_path / "pq"))
    (images / "notes.txt").write_text("a file it counted")
    with monkeypatch.context() as earlier_version:
        earlier_version.setattr(ingest_input.IngestInput, "cut_to", lambda found, names: found)
        first = ingest_coco(*args)
    (tmp_path / "pq" / "_annotated_files.json").unlink()  # it wrote none
    assert ingest_coco(*args).reused
    (images / "notes2.txt").write_text("another")
    rewritten = ingest_coco(*args)  # once more, as that version did; now listing the annotated files only
    assert not rewritten.reused and rewritten.fingerprint != first.fingerprint
    (images / "notes3.txt").write_text("counted no more")
    assert ingest_coco(*args).reused


def test_an_image_that_cannot_be_read_stops_the_ingest_rather_than_being_dropped_for_good(shapes_dataset, tmp_path):
    """Only a missing file is dropped; another read failure (here: a directory where the image should
    be; on object storage, throttling or a timeout) would otherwise be frozen into the manifest. The
    ingest that stops midway leaves the earlier one whole (it used to delete it first)."""
    root = tmp_path / "data"
    shutil.copytree(shapes_dataset / "images" / "val", root / "images")
    instances = json.loads((shapes_dataset / "annotations" / "instances_val.json").read_text())
    args = (str(root / "images"), str(shapes_dataset / "annotations" / "instances_val.json"), str(tmp_path / "pq"))
    name = instances["images"][3]["file_name"]
    (root / "images" / name).rename(tmp_path / name)
    (root / "images" / name).mkdir()
    with pytest.raises(Exception, match=f"cannot read .*{name}.*Not a missing file"):
        ingest_coco(*args, shard_size=2)
    assert read_manifest(args[2]) is None
    (root / "images" / name).rmdir()
    shutil.copy(tmp_path / name, root / "images" / name)
    earlier = ingest_coco(*args, shard_size=2)
    (root / "images" / name).unlink()
    (root / "images" / name).mkdir()
    with pytest.raises(Exception, match="Not a missing file.*an earlier ingest in the output is kept"):
        ingest_coco(*args, shard_size=2)  # its first shard written, its second stopped
    assert read_manifest(args[2])["fingerprint"] == earlier.fingerprint
    assert pq.read_table([str(tmp_path / "pq" / shard) for shard in earlier.shards]).num_rows == 12
    (root / "images" / name).rmdir()
    shutil.copy(shapes_dataset / "images" / "val" / instances["images"][0]["file_name"], root / "images" / name)
    again = ingest_coco(*args, shard_size=2)
    assert not again.reused and sorted(p.name for p in (tmp_path / "pq").glob("part-*")) == again.shards


def test_duplicate_image_ids_are_a_format_error_naming_both_files(tmp_path):
    from centernet_ray.data.coco import CocoFormatError, parse_coco

    data = {"images": [{"id": 1, "file_name": "a.jpg", "width": 10, "height": 10},
                       {"id": 1, "file_name": "b.jpg", "width": 10, "height": 10}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 2, 2]}],
            "categories": [{"id": 1, "name": "thing"}]}
    with pytest.raises(CocoFormatError, match=r"images\[1\] \(b.jpg\) has the id 1 of a.jpg"):
        parse_coco(data, "instances.json")


def test_ingest_reports_every_kind_of_bad_input(shapes_dataset, tmp_path):
    root, instances = broken_copy(shapes_dataset, tmp_path)
    result = ingest_coco(str(root / "images"), str(root / "instances.json"), str(tmp_path / "pq"))
    report = result.report
    assert result.rows == 12 - 2
    assert report["unreadable_images"] == 1 and report["missing_images"] == 1
    assert report["dropped_invalid"] == 2 and report["unknown_category"] == 1 and report["crowd_skipped"] == 1
    kept = sum(len(r["labels"]) for r in pq.read_table(tmp_path / "pq").to_pylist())
    assert report["annotations"] == kept
    manifest = read_manifest(str(tmp_path / "pq"))
    assert instances["images"][0]["file_name"] in manifest["examples"]["unreadable_images"][0]


def test_images_that_cannot_be_listed_are_warned_about_and_the_ingest_reused(shapes_dataset, tmp_path, monkeypatch,
                                                                             caplog):
    """Credentials that may read objects but not list them: the images are not compared (said once
    per run), and the shards of the same annotations are reused."""
    from centernet_ray import storage

    args = (str(shapes_dataset / "images" / "val"), str(shapes_dataset / "annotations" / "instances_val.json"),
            str(tmp_path / "pq"))
    ingest_coco(*args)

    def refused(folder):
        raise OSError("AWS Error ACCESS_DENIED during ListObjectsV2 operation")

    monkeypatch.setattr(storage, "file_sizes", refused)
    assert not ingest_coco(*args).reused  # the input as it can be seen now: ingested once more
    assert "cannot list" in caplog.text and "rerun with --force" in caplog.text
    assert ingest_coco(*args).reused


@pytest.mark.parametrize("folder", ["missing", "empty", "other", "file"])
def test_a_wrong_image_folder_is_refused_and_the_earlier_ingest_kept(shapes_dataset, tmp_path, folder):
    """``data.train_images`` mistyped, or naming another split's images: before, the ingest replaced
    the earlier one in the same output with 0 rows, and training failed later with "0 training
    images cannot fill one global batch", not saying why."""
    from centernet_ray.errors import UserInputError

    annotations = str(shapes_dataset / "annotations" / "instances_val.json")
    good = ingest_coco(str(shapes_dataset / "images" / "val"), annotations, str(tmp_path / "pq"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "other" / "2017").mkdir(parents=True)
    (tmp_path / "other" / "2017" / "a.jpg").write_bytes(b"")
    wrong = {"missing": tmp_path / "no_such_folder", "empty": tmp_path / "empty", "other": tmp_path / "other",
             "file": tmp_path / "other" / "2017" / "a.jpg"}[folder]
    expected = {"missing": "the image folder .*no_such_folder does not exist", "empty": "empty is empty",
                "other": r"other holds none of them \(1 file, e.g. 2017/a.jpg\)",
                "file": "a.jpg is a file, not a folder of images"}[folder]
    with pytest.raises(UserInputError, match=expected) as refusal:
        ingest_coco(str(wrong), annotations, str(tmp_path / "pq"))
    assert folder == "file" or "lists 12 images" in str(refusal.value) and str(refusal.value).endswith(
        "Nothing was ingested.")
    kept = read_manifest(str(tmp_path / "pq"))
    assert kept["rows"] == good.rows == 12 and pq.read_table(tmp_path / "pq").num_rows == 12


def test_images_none_of_which_can_be_read_are_an_error_not_an_empty_ingest(shapes_dataset, tmp_path):
    """Every file there but none an image (Git LFS pointers checked out without ``git lfs pull``)."""
    from centernet_ray.errors import UserInputError

    images = tmp_path / "pointers"
    shutil.copytree(shapes_dataset / "images" / "val", images)
    for path in images.iterdir():
        path.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1234\n")
    args = (str(images), str(shapes_dataset / "annotations" / "instances_val.json"), str(tmp_path / "pq"))
    with pytest.raises(UserInputError, match=r"none of the 12 images .* could be ingested .*unreadable_images=12"):
        ingest_coco(*args)
    assert read_manifest(args[2]) is None  # a rerun reads them again
    earlier = ingest_coco(str(shapes_dataset / "images" / "val"), *args[1:])
    with pytest.raises(UserInputError, match=r"none of the 12 .*Nothing was ingested \(what .*pq held is kept\)"):
        ingest_coco(*args)
    assert read_manifest(args[2])["fingerprint"] == earlier.fingerprint and pq.read_table(args[2]).num_rows == 12


def test_an_empty_ingest_left_by_an_earlier_version_is_not_reused(shapes_dataset, tmp_path):
    """Versions before the refusal above wrote a manifest of 0 rows for a wrong image folder: it is
    ingested again, not reused."""
    args = (str(shapes_dataset / "images" / "val"), str(shapes_dataset / "annotations" / "instances_val.json"),
            str(tmp_path / "pq"))
    ingest_coco(*args)
    manifest = read_manifest(args[2])
    report = {**manifest["report"], "images": 0, "missing_images": 12}
    (tmp_path / "pq" / "_manifest.json").write_text(json.dumps({**manifest, "rows": 0, "shards": [], "report": report}))
    again = ingest_coco(*args)
    assert not again.reused and again.rows == 12


def test_datasets_given_by_their_own_paths_are_ingested_into_folders_of_their_own(shapes_dataset, tmp_path,
                                                                                  monkeypatch):
    """No ``data.root`` or ``data.parquet_dir``: before, every such dataset was ingested into the
    cache's one ``parquet/{train,val}``, so a second dataset replaced the first's shards (under a run
    reading them) and going back ingested the first again."""
    from dataclasses import replace

    from centernet_ray.config import DataConfig
    from centernet_ray.data.sources import split_sources

    monkeypatch.setenv("CENTERNET_RAY_CACHE", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(shapes_dataset, copy)
    first, second = (DataConfig(train_images=str(root / "images" / "train"),
                                train_annotations=str(root / "annotations" / "instances_train.json"),
                                val_images=str(root / "images" / "val"),
                                val_annotations=str(root / "annotations" / "instances_val.json"))
                     for root in (shapes_dataset, copy))
    sources = [split_sources(config)["val"] for config in (first, second)]
    assert sources[0].parquet != sources[1].parquet
    assert all(os.path.basename(s.parquet).startswith("instances_val-") for s in sources)
    assert split_sources(first)["train"].parquet not in {s.parquet for s in sources}
    results = [ingest_coco(s.images, s.annotations, s.parquet) for s in (*sources, sources[0])]
    assert [r.reused for r in results] == [False, False, True]  # the first dataset's ingest is still there

    monkeypatch.chdir(copy)  # the same files named from their folder: the same place
    relative = replace(second, val_images="images/val", val_annotations="annotations/instances_val.json")
    assert split_sources(relative)["val"].parquet == sources[1].parquet
    assert split_sources(replace(first, parquet_dir="pq"))["val"].parquet == "pq/val"
    assert split_sources(DataConfig(root=str(copy)))["val"].parquet == str(copy / "parquet" / "val")


def test_two_commands_ingesting_one_dataset_at_once_write_it_once(shapes_dataset, tmp_path, monkeypatch):
    """Two jobs started together on a dataset not yet ingested: before, both found no manifest and
    both deleted and wrote the shards, one under the other's reads. Now the second waits for the
    first's lease on the output, then reuses what it wrote."""
    import threading

    from centernet_ray import lease
    from centernet_ray.ray_data import ingest

    monkeypatch.setattr(lease, "POLL_S", 0.05)
    write_shard, writes = ingest.write_shard, []

    def slowly(*args):
        writes.append(args[2])
        time.sleep(0.3)
        return write_shard(*args)

    monkeypatch.setattr(ingest, "write_shard", slowly)
    args = (str(shapes_dataset / "images" / "val"), str(shapes_dataset / "annotations" / "instances_val.json"),
            str(tmp_path / "pq"))
    results = []
    threads = [threading.Thread(target=lambda: results.append(ingest_coco(*args, shard_size=4))) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.reused for r in results) == [False, True] and writes == [0, 1, 2]
    assert pq.read_table(tmp_path / "pq").num_rows == 12 and not (tmp_path / "pq" / lease.LEASE_FILE).exists()


def test_an_ingest_a_run_reads_is_not_replaced_under_it(shapes_dataset, tmp_path):
    """A training run reads the shards of ``pq``; meanwhile the images change and another command
    ingests again into it: before, it deleted and rewrote them under the run's next epoch. Now it
    is refused, naming the reader, until the run ends; the same input is still reused."""
    from centernet_ray import lease
    from centernet_ray.errors import UserInputError

    images = tmp_path / "images"
    shutil.copytree(shapes_dataset / "images" / "val", images)
    args = (str(images), str(shapes_dataset / "annotations" / "instances_val.json"), str(tmp_path / "pq"))
    with lease.held(str(tmp_path / "run"), what="training run r", instead="-") as run:
        ingest_coco(*args, reading=run)
        marks = [p.name for p in (tmp_path / "pq").iterdir() if p.name.startswith(lease.READER_MARK)]
        assert marks == [lease.READER_MARK + run.token]
        assert ingest_coco(*args).reused  # the same input: nothing to replace
        fixed = images / sorted(os.listdir(images))[0]
        fixed.write_bytes(fixed.read_bytes() + b"\0" * 16)  # an image saved again meanwhile
        for again in (dict(), dict(force=True)):
            with pytest.raises(UserInputError, match=r"ingesting .*instances_val.json would replace the shards in "
                                                     r".*pq, but another command reads .*pq: `.*` \(pid \d+ .*Wait for "
                                                     r"it to end, or ingest into another folder \(data.parquet_dir"):
                ingest_coco(*args, **again)
        assert pq.read_table(tmp_path / "pq").num_rows == 12 and read_manifest(args[2])["rows"] == 12
    assert not [p for p in (tmp_path / "pq").iterdir() if p.name.startswith(lease.READER_MARK)]
    assert not ingest_coco(*args).reused  # the run ended: ingested again


def test_a_reader_mark_left_by_a_killed_command_is_removed_after_a_watch(shapes_dataset, tmp_path, monkeypatch):
    from centernet_ray import lease

    monkeypatch.setattr(lease, "HEARTBEAT_S", 0.05)
    args = (str(shapes_dataset / "images" / "val"), str(shapes_dataset / "annotations" / "instances_val.json"),
            str(tmp_path / "pq"))
    ingest_coco(*args)
    silent_since = time.time() - lease.STALE_AFTER_S - 1
    mark = tmp_path / "pq" / (lease.READER_MARK + "gone")
    mark.write_text(json.dumps({"token": "gone", "pid": 1, "host": "h", "command": "c", "started": silent_since,
                                "heartbeat": silent_since}))
    assert not ingest_coco(*args, force=True).reused and not mark.exists()


def test_an_ingest_written_by_another_command_just_before_this_one_took_the_lease_is_reused(shapes_dataset, tmp_path,
                                                                                            monkeypatch):
    """This command found no manifest; another one wrote the same input and ended before this one
    took the output's lease (it never waited): it looks again, and reuses instead of writing again."""
    from centernet_ray import lease
    from centernet_ray.ray_data import ingest

    args = (str(shapes_dataset / "images" / "val"), str(shapes_dataset / "annotations" / "instances_val.json"),
            str(tmp_path / "pq"))
    held = lease.held

    def another_command_first(*a, **k):
        monkeypatch.setattr(lease, "held", held)
        ingest_coco(*args)
        return held(*a, **k)

    monkeypatch.setattr(lease, "held", another_command_first)
    write_shard, writes = ingest.write_shard, []
    monkeypatch.setattr(ingest, "write_shard", lambda *a: writes.append(a[2]) or write_shard(*a))
    assert ingest_coco(*args).reused and writes == [0]  # the other command's one shard


def test_an_ingest_replaced_between_the_look_and_the_reader_s_mark_is_not_reused(shapes_dataset, tmp_path,
                                                                                 monkeypatch):
    """A training run found the output up to date; before its reader mark landed, another command
    replaced it with another dataset: the run reads it back, and ingests its own again."""
    from centernet_ray import lease

    val = (str(shapes_dataset / "images" / "val"), str(shapes_dataset / "annotations" / "instances_val.json"))
    train = (str(shapes_dataset / "images" / "train"), str(shapes_dataset / "annotations" / "instances_train.json"))
    output = str(tmp_path / "pq")
    ingest_coco(*val, output)
    read = lease.Lease.read

    def replaced_first(self, folder):
        monkeypatch.setattr(lease.Lease, "read", read)
        ingest_coco(*train, output)  # the other dataset, 24 images
        read(self, folder)

    monkeypatch.setattr(lease.Lease, "read", replaced_first)
    with lease.held(str(tmp_path / "run"), what="training run r", instead="-") as run:
        result = ingest_coco(*val, output, reading=run)
        assert not result.reused and result.rows == 12 and read_manifest(output)["rows"] == 12
        assert (tmp_path / "pq" / (lease.READER_MARK + run.token)).exists()
