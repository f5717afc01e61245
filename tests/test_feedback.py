"""The feedback folder: saves that lose nothing under concurrency, a cap, files that are not
examples reported and not fatal, odd entries and a full disk that never spoil a save, a review,
and an export (class names mapped to folders, split by content, duplicates left out) that the
image-folder reader maps back."""

import base64
import errno
import json
import multiprocessing
import os
import pathlib

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli
from toolkit.core.errors import ToolkitError
from toolkit.data.datasets import get_dataset
from toolkit.data.imagefolder import image_folder_sha256, read_image_folder
from toolkit.feedback.store import INDEX, FeedbackStore, export_image_folder, is_heldout, new_example
from toolkit.imaging.decode import MAX_FILE_BYTES

DIGITS = [str(d) for d in range(10)]
FASHION = list(get_dataset("fashion-mnist").class_names)


def _example(label="3", predicted="8", variant=0, classes=DIGITS):
    """A correction; examples of different `variant`s are different drawings."""
    drawing = Image.new("L", (400, 400), 255)
    drawing.paste(0, (100, 60, 180 + variant % 200, 340))
    seen = np.zeros((28, 28), dtype=np.float32)
    seen[8:20, 10:18] = 1
    seen.flat[variant % 784] = 0.5
    probabilities = {name: (0.9 if name == predicted else 0.1 / (len(classes) - 1)) for name in classes}
    return new_example(drawing, seen, label, predicted, probabilities, "0" * 64)


def _index_ids(folder):
    return [json.loads(line)["id"] for line in (folder / INDEX).read_text().splitlines()]


def _save_many(folder, count):
    store = FeedbackStore(folder)
    for index in range(count):
        store.save(_example(str(index % 10)))


def test_an_example_round_trips_with_all_its_fields(tmp_path):
    store = FeedbackStore(tmp_path / "fb")
    saved = _example()
    path = store.save(saved)
    assert path.name == f"{saved.id}.json"
    [loaded], problems = store.examples()
    assert problems == [] and loaded == saved and loaded.corrected
    line = json.loads((tmp_path / "fb" / "index.jsonl").read_text())
    assert line == {"id": saved.id, "time": saved.time, "label": "3", "predicted": "8"}


def test_saves_from_several_processes_at_once_lose_nothing(tmp_path):
    folder = tmp_path / "fb"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_save_many, args=(folder, 25)) for _ in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
        assert worker.exitcode == 0
    examples, problems = FeedbackStore(folder).examples()
    assert len(examples) == 100 and problems == []
    index = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
    assert sorted(line["id"] for line in index) == sorted(e.id for e in examples)


def test_a_full_folder_refuses_with_one_clear_message(tmp_path):
    store = FeedbackStore(tmp_path / "fb", max_examples=3)
    for _ in range(3):
        store.save(_example())
    with pytest.raises(ToolkitError, match=r"is full \(3 examples"):
        store.save(_example())
    assert len(store.examples()[0]) == 3


def test_files_that_are_not_examples_are_reported_and_the_rest_read(tmp_path):
    folder = tmp_path / "fb"
    store = FeedbackStore(folder)
    kept = [store.save(_example()) for _ in range(2)]
    (folder / "notes.json").write_text('{"format": "something else"}')
    (folder / "cut.json").write_bytes(kept[0].read_bytes()[:100])
    renamed = json.loads(kept[1].read_text())
    (folder / "other-name.json").write_text(json.dumps(renamed))
    bomb = json.loads(kept[1].read_text())
    bomb["id"] = "bomb"
    bomb["drawing_png"] = base64.b64encode(b"\x89PNG\r\n\x1a\nnot really").decode()
    (folder / "bomb.json").write_text(json.dumps(bomb))
    examples, problems = store.examples()
    assert len(examples) == 2 and len(problems) == 4
    assert {p.split(":")[0] for p in problems} == {"notes.json", "cut.json", "other-name.json", "bomb.json"}


def test_labels_that_are_not_class_names_never_leave_the_export_folder(tmp_path):
    folder = tmp_path / "fb"
    store = FeedbackStore(folder)
    good = store.save(_example())
    for name, label in (("up", "../../escaped"), ("root", str(tmp_path / "abs")), ("dot", ".")):
        forged = json.loads(good.read_text())
        forged.update(id=name, label=label)
        (folder / f"{name}.json").write_text(json.dumps(forged))
    small = json.loads(good.read_text())
    small.update(id="small", seen_png=small["drawing_png"])  # 400x400 where the 28x28 belongs
    (folder / "small.json").write_text(json.dumps(small))
    os.mkfifo(folder / "pipe.json")
    examples, problems = store.examples()
    assert len(examples) == 1 and len(problems) == 5
    export_image_folder(examples, tmp_path / "out")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "abs").exists()
    assert [p.relative_to(tmp_path / "out").parts[1] for p in (tmp_path / "out").rglob("*.png")] == ["3"]


def test_dropping_an_example_and_refusing_paths(tmp_path):
    store = FeedbackStore(tmp_path / "fb")
    example = _example()
    store.save(example)
    (tmp_path / "fb" / "notes.json").write_text("{}")
    for odd in ("../fb/" + example.id, "notes", "x" * 300):
        with pytest.raises(ToolkitError, match="no example"):
            store.drop(odd)
    assert (tmp_path / "fb" / "notes.json").exists()  # only examples are dropped
    store.drop(example.id)
    assert store.examples()[0] == []


def test_the_export_split_is_by_example_and_never_moves(tmp_path):
    store = FeedbackStore(tmp_path / "fb")
    for variant in range(40):
        store.save(_example(label="5", variant=variant))
    first, _ = store.examples()
    export_image_folder(first, tmp_path / "out1")
    for variant in range(40, 80):
        store.save(_example(label="6", variant=variant))
    grown, _ = store.examples()
    counts = export_image_folder(grown, tmp_path / "out2")
    assert counts["train"] + counts["heldout"] == 80 and 0 < counts["heldout"] < 80
    for example in first:  # where an example went does not depend on the others
        part = "heldout" if is_heldout(example.content_sha256) else "train"
        assert (tmp_path / "out1" / part / "5" / f"{example.id}.png").is_file()
        assert (tmp_path / "out2" / part / "5" / f"{example.id}.png").is_file()
    drawing = Image.open(next((tmp_path / "out2").rglob("*.png")))
    assert drawing.size == (400, 400)  # the drawing as drawn, not the 28x28


def test_review_and_export_on_the_command_line(tmp_path):
    folder = tmp_path / "fb"
    store = FeedbackStore(folder)
    for variant, (label, predicted) in enumerate([("3", "8"), ("3", "8"), ("7", "7"), ("4", "9")]):
        store.save(_example(label, predicted, variant))
    (folder / "junk.json").write_text("[]")
    result = run_cli("feedback", folder, "--out", tmp_path / "review")  # review is the default
    assert result.returncode == 0, result.stderr
    assert "junk.json: not a feedback example" in result.stderr
    report = json.loads((tmp_path / "review" / "feedback.json").read_text())
    assert report["examples"] == 4 and report["corrected"] == 3 and report["per_class"] == {"3": 2, "4": 1, "7": 1}
    assert report["confusions"][0] == {"label": "3", "predicted": "8", "count": 2}
    assert (tmp_path / "review" / "feedback.png").is_file() and "3 taken for 8: 2" in result.stdout
    exported = run_cli("feedback", "export", folder, tmp_path / "images")
    assert exported.returncode == 0, exported.stderr
    assert len(list((tmp_path / "images").rglob("*.png"))) == 4
    again = run_cli("feedback", "export", folder, tmp_path / "images")
    assert again.returncode == 1 and "exists and is not an empty folder" in again.stderr
    into_a_file = run_cli("feedback", "export", folder, folder / "index.jsonl")
    assert into_a_file.returncode == 1 and "Traceback" not in into_a_file.stderr


def test_the_same_drawing_saved_again_is_on_one_side_and_exported_once(tmp_path):
    store = FeedbackStore(tmp_path / "fb")
    for _ in range(10):  # Save clicked ten times: ten examples, ten ids, one drawing
        store.save(_example(label="3", variant=7))
    store.save(_example(label="8", variant=7))  # the same drawing, another label: kept
    for variant in range(20):
        store.save(_example(label="5", variant=100 + variant))
    examples, _ = store.examples()
    assert len(examples) == 31
    counts = export_image_folder(examples, tmp_path / "out")
    assert counts["duplicates"] == 9 and counts["train"] + counts["heldout"] == 22
    exported = [p.relative_to(tmp_path / "out").parts[:2] for p in (tmp_path / "out").rglob("*.png")]
    same = [part for part, label in exported if label in ("3", "8")]
    assert len(same) == 2 and len(set(same)) == 1  # one copy of each label, both on one side
    assert len({part for part, label in exported if label == "5"}) == 2  # other drawings spread


def test_fashion_mnist_class_names_are_mapped_to_folders_and_back(tmp_path):
    folder = tmp_path / "fb"
    store = FeedbackStore(folder)
    saved = [store.save(_example(name, FASHION[(i + 1) % 10], i, FASHION)) for i, name in enumerate(FASHION)]
    store.save(_example("T-shirt/top", "Shirt", 50, FASHION))
    examples, problems = store.examples()
    assert problems == [] and len(examples) == 11
    counts = export_image_folder(examples, tmp_path / "out", heldout_percent=0)
    assert counts["train"] == 11
    folders = sorted(p.name for p in (tmp_path / "out" / "train").iterdir())
    assert "T-shirt%2Ftop" in folders and "Ankle boot" in folders and len(folders) == 10
    images = read_image_folder(tmp_path / "out" / "train", FASHION)  # what `train --extra-data` reads
    assert images.problems == [] and len(images) == 11
    by_id = {e.id: e.label for e in examples}
    assert [FASHION[label] for label in images.labels] == [by_id[f.stem] for f in images.files]
    assert images.sha256 == image_folder_sha256(tmp_path / "out" / "train", FASHION)
    store.drop(pathlib.Path(saved[0]).stem)  # a T-shirt/top: found, so it can be dropped
    assert len(store.examples()[0]) == 10
    review = run_cli("feedback", folder, "--out", tmp_path / "review")
    assert review.returncode == 0 and "left out" not in review.stderr, review.stderr


def test_class_names_no_file_can_carry_still_get_folders_of_their_own(tmp_path):
    """A foreign model's metadata may name a class "" or in 29 CJK characters (87 bytes, 261
    once percent-encoded): its corrections are kept, reviewed, exported and read back too."""
    classes = ["", "\u6f22" * 29, "\u6f22" * 28 + "\u5b57", "plain", *(str(d) for d in range(6))]
    folder = tmp_path / "fb"
    store = FeedbackStore(folder)
    for i, name in enumerate(classes):
        store.save(_example(name, classes[(i + 1) % len(classes)], i, classes))
    examples, problems = store.examples()
    assert problems == [] and len(examples) == len(classes)
    export_image_folder(examples, tmp_path / "out", heldout_percent=0)
    folders = [p.name for p in (tmp_path / "out" / "train").iterdir()]
    assert len(set(folders)) == len(classes) and all(len(f.encode()) <= 255 for f in folders)
    images = read_image_folder(tmp_path / "out" / "train", classes)
    assert images.problems == [] and len(images) == len(classes)
    by_id = {e.id: e.label for e in examples}
    assert [classes[label] for label in images.labels] == [by_id[f.stem] for f in images.files]


def test_image_folder_files_over_the_size_cap_are_left_out_unread(tmp_path):
    root = tmp_path / "images"
    (root / "3").mkdir(parents=True)
    Image.new("L", (60, 60), 255).save(root / "3" / "blank.png")
    drawing = Image.new("L", (60, 60), 255)
    drawing.paste(0, (20, 10, 40, 50))
    drawing.save(root / "3" / "one.png")
    before = image_folder_sha256(root, DIGITS)
    with open(root / "3" / "huge.png", "wb") as f:
        f.truncate(MAX_FILE_BYTES + 1)  # sparse: no disk used
    images = read_image_folder(root, DIGITS)
    assert len(images) == 1 and len(images.problems) == 2
    assert any("huge.png" in p and "too big" in p and "left out" in p for p in images.problems)
    assert images.sha256 == image_folder_sha256(root, DIGITS) == before  # what was read, once


def test_odd_entries_in_the_folder_never_stop_a_save(tmp_path):
    folder = tmp_path / "fb"
    store = FeedbackStore(folder)
    store.save(_example())
    with open(tmp_path / "big", "wb") as f:
        f.truncate(600 * 2**20)  # sparse: a link to it must not fill the 500 MB folder
    (folder / "dangling.json").symlink_to(tmp_path / "gone")
    (folder / ("b" * 32 + ".json")).symlink_to(tmp_path / "big")
    (folder / "big.json").symlink_to(tmp_path / "big")
    (folder / "folder.json").mkdir()
    os.mkfifo(folder / "pipe.json")
    (folder / "locked.json").write_text("{}")
    (folder / "locked.json").chmod(0)
    for variant in range(1, 3):
        store.save(_example(variant=variant))
    examples, problems = store.examples()
    assert len(examples) == 3 and len(problems) == 6 and len(_index_ids(folder)) == 3


@pytest.mark.parametrize("step", ["example", "index write", "index fsync"])
def test_a_full_disk_mid_save_leaves_no_half_example_and_a_retry_saves_once(tmp_path, monkeypatch, step):
    folder = tmp_path / "fb"
    store = FeedbackStore(folder)
    store.save(_example(variant=1))
    index_before = (folder / INDEX).read_bytes()
    real_write = os.write

    def is_index(fd):
        return os.readlink(f"/proc/self/fd/{fd}").endswith(INDEX)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def half_then_full(fd, data):
        if not is_index(fd):
            return real_write(fd, data)
        monkeypatch.setattr(os, "write", lambda fd, data: disk_full() if is_index(fd) else real_write(fd, data))
        return real_write(fd, data[: len(data) // 2])  # a short write, as a disk filling up gives

    real_fsync = os.fsync
    if step == "example":
        monkeypatch.setattr(pathlib.Path, "write_bytes", disk_full)
    elif step == "index write":
        monkeypatch.setattr(os, "write", half_then_full)
    else:
        monkeypatch.setattr(os, "fsync", lambda fd: disk_full() if is_index(fd) else real_fsync(fd))
    with pytest.raises(ToolkitError, match="No space left on device"):
        store.save(_example(variant=2))
    monkeypatch.undo()
    assert len(list(folder.glob("*.json"))) == 1 and (folder / INDEX).read_bytes() == index_before
    assert not list(folder.glob(".*.tmp"))
    store.save(_example(variant=2))  # the person clicks Save again
    examples, problems = store.examples()
    assert len(examples) == 2 and problems == [] and sorted(_index_ids(folder)) == sorted(e.id for e in examples)
