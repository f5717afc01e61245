"""The feedback folder: saves that lose nothing under concurrency, a cap, files that are not
examples reported and not fatal, a review, and an export whose split never moves."""

import base64
import json
import multiprocessing
import os

import numpy as np
import pytest
from PIL import Image

from tests.conftest import run_cli
from toolkit.errors import ToolkitError
from toolkit.feedback import FeedbackStore, export_image_folder, is_heldout, new_example


def _example(label="3", predicted="8"):
    drawing = Image.new("L", (400, 400), 255)
    seen = np.zeros((28, 28), dtype=np.float32)
    seen[8:20, 10:18] = 1
    probabilities = {str(d): (0.9 if str(d) == predicted else 0.1 / 9) for d in range(10)}
    return new_example(drawing, seen, label, predicted, probabilities, "0" * 64)


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
    for _ in range(40):
        store.save(_example(label="5"))
    first, _ = store.examples()
    export_image_folder(first, tmp_path / "out1")
    for _ in range(40):
        store.save(_example(label="6"))
    grown, _ = store.examples()
    counts = export_image_folder(grown, tmp_path / "out2")
    assert counts["train"] + counts["heldout"] == 80 and 0 < counts["heldout"] < 80
    for example in first:  # where an example went does not depend on the others
        part = "heldout" if is_heldout(example.id) else "train"
        assert (tmp_path / "out1" / part / "5" / f"{example.id}.png").is_file()
        assert (tmp_path / "out2" / part / "5" / f"{example.id}.png").is_file()
    drawing = Image.open(next((tmp_path / "out2").rglob("*.png")))
    assert drawing.size == (400, 400)  # the drawing as drawn, not the 28x28


def test_review_and_export_on_the_command_line(tmp_path):
    folder = tmp_path / "fb"
    store = FeedbackStore(folder)
    for label, predicted in [("3", "8"), ("3", "8"), ("7", "7"), ("4", "9")]:
        store.save(_example(label, predicted))
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
