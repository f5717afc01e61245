"""Benchmarks are not tests: these only check each bench command runs on a tiny setting and writes valid JSON."""

import json

import pytest

from tests.conftest import run_cli


def test_bench_infer_writes_rows_for_every_backend(export_dir, tmp_path):
    out = tmp_path / "infer.json"
    result = run_cli("bench", "infer", export_dir, "--batch-sizes", "1,3", "--seconds", "0.01", "--rounds", "2",
                     "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["rounds"] == 2 and all(row["runs"] >= 2 * 3 for row in data["rows"])
    backends = {row["backend"] for row in data["rows"]}
    assert {"pytorch-eager", "torchscript", "torch-export", "onnxruntime-cpu", "onnxruntime-cpu-int8"} <= backends
    for row in data["rows"]:
        assert {"backend", "batch_size", "p50_us", "p99_us", "images_per_s", "speedup_vs_eager"} <= set(row)
        assert row["p50_us"] > 0 and row["p99_us"] >= row["p50_us"] and row["images_per_s"] > 0
    eager = [row for row in data["rows"] if row["backend"] == "pytorch-eager"]
    assert all(row["speedup_vs_eager"] == 1.0 for row in eager)


@pytest.mark.slow  # trains for tens of seconds
def test_bench_train_compares_with_the_notebook_loop(mnist_dir, tmp_path):
    out = tmp_path / "train.json"
    result = run_cli("bench", "train", "mlp", "--data-dir", mnist_dir, "--notebook-batches", "5",
                     "--limit-train", "1000", "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert data["arch"] == data["notebook"]["arch"] == "mlp"
    assert data["toolkit"]["images_per_s"] > 0 and data["notebook"]["images_per_s"] > 0
    assert data["speedup_images_per_s"] == data["toolkit"]["images_per_s"] / data["notebook"]["images_per_s"]


def test_bench_classify_times_each_kind_of_request(export_dir, tmp_path):
    out = tmp_path / "classify.json"
    result = run_cli("bench", "classify", export_dir, "--repeats", "1", "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    assert [row["input"] for row in data["rows"]] == [
        "upload (PNG file)", "sketchpad 400x400 RGBA", "photo 1000x1000 RGB"]
    for row in data["rows"]:
        assert row["p99_ms"] >= row["p50_ms"] > 0 and row["requests"] == row["inputs"] == 10
        # The synthetic canvases and photos are the example digits redrawn: most must be read right.
        assert row["correct"] >= 8, row


def test_bench_serve_drives_concurrent_clients(export_dir, tmp_path):
    out = tmp_path / "serve.json"
    result = run_cli("bench", "serve", export_dir, "--clients", "2", "--requests", "6", "--malformed-every", "3",
                     "--sample-every", "2", "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    # Well-formed requests answered with their label, corrupt ones rejected readably: no errors.
    assert data["requests"] == 6 and data["malformed_requests"] == 2 and data["errors"] == 0, data["error_examples"]
    assert data["p50_ms"] > 0 and data["server_side_p50_ms"] > 0
    assert data["server_rss_mb_before"] > 0
    # The soak: RSS read before the load and every 2 requests, its growth fitted.
    assert [s["requests"] for s in data["rss_samples"]] == [0, 2, 4, 6]
    assert all(s["rss_mb"] > 0 for s in data["rss_samples"])
    assert all(isinstance(data[key], float)
               for key in ("rss_slope_mb_per_1000", "rss_slope_second_half_mb_per_1000"))
    assert "RSS slope" in result.stdout


def test_bench_rejects_bad_batch_sizes(export_dir):
    result = run_cli("bench", "infer", export_dir, "--batch-sizes", "1,x")
    assert result.returncode != 0 and "--batch-sizes must be integers" in result.stderr


@pytest.mark.slow  # starts three servers
def test_bench_serve_oip_measures_every_server_kind_and_client_count(quick_export, tmp_path):
    out = tmp_path / "serve-oip.json"
    result = run_cli("bench", "serve", quick_export, "--server", "serve", "--clients", "1,3", "--requests", "10",
                     "--rounds", "2", "--malformed-every", "5", "--workers", "2", "--json", out)
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    runs = {(r["server"], r["kind"], r["clients"]): r for r in data["runs"]}
    servers = ("toolkit serve, batching on, 2 workers", "toolkit serve, batching off, 2 workers", "bare endpoint")
    kinds = ("tensor-json", "tensor-binary", "image")
    expected = {(s, k, c) for s in servers for k in kinds for c in (1, 3) if (s, k) != ("bare endpoint", "image")}
    assert set(runs) == expected
    for (server, _, _), run in runs.items():
        assert run["errors"] == 0, run["error_examples"]  # malformed requests got their 400
        assert run["rounds"] == 2 and run["throughput_rps"] > 0 and run["p99_ms"] >= run["p50_ms"] > 0
        assert run["malformed_requests"] == (0 if server == "bare endpoint" else 4)
    assert all(s["rss_mb_before"] > 0 and s["rss_mb_after"] > 0 for s in data["servers"])
    assert "medians of 2 rounds" in " ".join(result.stdout.split())  # however the table's title wraps
