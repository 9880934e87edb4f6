"""The benchmark harness on the CPU: it runs, its figures are positive, its ratios are computed right."""
import json

import pytest

from jobs.bench import scaling, train
from jobs.bench.common import ratio

TINY = ["--model", "A", "--width", "0.0625", "--batch", "4", "--image-size", "32", "--classes", "5",
        "--warmup", "1", "--iters", "2"]


def test_train_bench_figures_and_ratios(tmp_path, capsys):
    out = tmp_path / "train.json"
    rows = train.main(TINY + ["--variants", "fp32,bf16-cl", "--reference", "fp32", "--out", str(out)])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in printed] == ["fp32", "bf16-cl"]
    for r in rows:
        assert r["images_per_s"] > 0 and r["tflops"] > 0 and r["device"].startswith("CPU")
        assert r["peak_fraction"] is None  # no matmul peak is measured on a CPU
        assert r["tflops"] == pytest.approx(3 * r["gflops_per_image_fwd"] * 1e9 * r["images_per_s"] / 1e12)
        assert r["vs_reference"] == pytest.approx(r["images_per_s"] / rows[0]["images_per_s"])
    assert rows[0]["vs_reference"] == pytest.approx(1.0)
    assert json.loads(out.read_text()) == rows


def test_profile_writes_the_costliest_ops_and_shares_that_add_up(tmp_path):
    rows = train.main(TINY + ["--variants", "fp32", "--reference", "fp32", "--profile", str(tmp_path)])
    shares = [rows[0][f"time_share_{k}"] for k in train.KINDS]
    assert sum(shares) == pytest.approx(1.0) and rows[0]["time_share_conv"] > 0   # a VGG is mostly convs
    top = json.loads((tmp_path / "fp32.json").read_text())["top"]
    assert top and [t["share"] for t in top] == sorted((t["share"] for t in top), reverse=True)
    assert any(t["kind"] == "conv" for t in top)


@pytest.mark.parametrize("name, kind", [
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc", "conv"),
    ("cudnn::engines_precompiled::nchwToNhwcKernel", "conv"),
    ("aten::convolution_backward", "conv"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "gemm"),
    ("cutlass::Kernel2<cutlass_80_wmma_tensorop_bf16_s161616gemm>", "gemm"),
    ("triton_poi_fused_relu_threshold_backward_3", "generated"),
    ("triton_poi_fused_convolution_relu_3", "generated"),               # Inductor's bias + ReLU after cuDNN
    ("triton_red_fused_convolution_backward_threshold_backward_7", "generated"),
    ("nvjet_tst_192x192_64x4_2x1_v_bz_coopA_TNT", "gemm"),
    ("cpp_fused_relu_0", "generated"),
    ("void at::native::(anonymous namespace)::max_pool_forward_nhwc", "other"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>", "other"),
])
def test_kernel_kinds(name, kind):
    assert train.kernel_kind(name) == kind


def test_time_shares_without_time_are_null():
    assert set(train.time_shares({}).values()) == {None}
    assert train.time_shares({"triton_a": 1.0, "gemm_b": 3.0}) == {
        "time_share_conv": 0.0, "time_share_gemm": 0.75, "time_share_generated": 0.25, "time_share_other": 0.0}


def test_forward_flops_of_vgg16_is_the_papers_15_5_gmac():
    import model
    assert train.forward_flops(model.build("D"), 224) == 2 * 15_470_264_320


def test_zero_timed_iterations_is_an_error(capsys):
    with pytest.raises(SystemExit):
        train.main(TINY[:-2] + ["--iters", "0"])
    assert "--iters: must be at least 1, got 0" in capsys.readouterr().err


def test_unknown_variant_is_an_error():
    with pytest.raises(SystemExit, match="unknown variant"):
        train.main(TINY + ["--variants", "turbo"])


def test_ratio_without_a_denominator_is_null():
    assert ratio(3.0, 2.0) == 1.5 and ratio(1.0, 0.0) is None


def test_allreduce_model():
    assert scaling.allreduce_seconds(1e9, 1, 100) == 0
    # Ring all-reduce: 2(n-1)/n of the bytes through the slowest link.
    assert scaling.allreduce_seconds(1e9, 2, 100) == pytest.approx(1e9 / 100e9)
    assert scaling.allreduce_seconds(1e9, 8, 100) == pytest.approx(1.75e9 / 100e9)


def test_vgg_layers_add_up_to_the_model():
    layers = scaling.vgg_layers("D")
    assert sum(layer.params for layer in layers) == 138_357_544
    assert sum(layer.fwd_flops for layer in layers) == 2 * 15_470_264_320


def test_overlap_and_bf16_never_slow_a_step_and_efficiency_is_at_most_one():
    layers = scaling.vgg_layers("D")
    plain = scaling.step_seconds(layers, 0.01, 16, 12.5, overlap=False, latency_s=0)
    overlapped = scaling.step_seconds(layers, 0.01, 16, 12.5, latency_s=0)
    halved = scaling.step_seconds(layers, 0.01, 16, 12.5, grad_bytes=2, latency_s=0)
    assert 0.01 < halved < overlapped < plain
    # With an infinitely fast link there is nothing to hide.
    assert scaling.step_seconds(layers, 0.01, 16, 1e12, latency_s=0) == pytest.approx(0.01, rel=1e-6)
    for row in scaling.table(5000.0, 256):
        assert 0 < row["efficiency_no_overlap"] <= row["efficiency_overlap_bf16"] <= 1


def test_scaling_reads_the_newest_committed_rate(tmp_path, capsys):
    rate, file = scaling.measured_rate("vgg16")                    # benchmarks/results/ in the repository
    assert rate > 0 and file.endswith(".json")
    rows = scaling.main([])
    assert f"{rate:.0f} images/s" in capsys.readouterr().out
    assert rows == scaling.table(rate, 256, "D")
    row = {"bench": "train", "model": "D", "variant": scaling.RATE_VARIANT}
    for date, ips in (("2026-01-02", 200.0), ("2025-12-31", 100.0)):
        (tmp_path / f"{date}.json").write_text(json.dumps({"date": date, "figures": [{**row, "images_per_s": ips}]}))
    (tmp_path / "cpu.json").write_text(json.dumps([{"bench": "preprocess", "images_per_s": 1.0}]))
    assert scaling.measured_rate("D", results=tmp_path) == (200.0, "2026-01-02.json")
    with pytest.raises(SystemExit, match="no train-bench figure for net E.*pass --images-per-s"):
        scaling.measured_rate("E", results=tmp_path)


# --- the benches that read shards: one tiny synthetic sample for all of them --------------------------

SAMPLE = ["--classes", "2", "--per-class", "8", "--size", "48,64"]
CROP = ["--crop", "32", "--scale-min", "32", "--scale-max", "48"]


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return str(tmp_path_factory.mktemp("bench-sample"))


def test_loader_bench_dali_vs_torchvision(work, tmp_path):
    from jobs.bench import loader

    out = tmp_path / "loader.json"
    loader.main(["--work", work, "--device", "cpu", "--threads", "1", "--workers", "0", "--batch-size", "4",
                 "--steps", "2", "--warmup", "1", "--out", str(out)] + SAMPLE + CROP)
    dali, tv, r = json.loads(out.read_text())
    assert (dali["pipeline"], tv["pipeline"], r["pipeline"]) == ("dali", "torchvision", "ratio")
    assert dali["images_per_s"] > 0 and tv["images_per_s"] > 0 and dali["images_per_cpu_s"] > 0
    assert dali["steps_per_epoch"] == 16 // 4
    assert r["dali_over_torchvision"] == pytest.approx(dali["images_per_s"] / tv["images_per_s"])
    assert r["dali_over_torchvision_per_cpu_s"] == pytest.approx(dali["images_per_cpu_s"] / tv["images_per_cpu_s"])


def test_e2e_bench_resident_fed_and_synced_side_by_side(work, tmp_path):
    from jobs.bench import e2e

    out = tmp_path / "e2e.json"
    rows = e2e.main(["--work", work, "--model", "A", "--width", "0.0625", "--batch", "4", "--variant", "fp32",
                     "--device", "cpu", "--threads", "1", "--warmup", "1", "--steps", "3", "--out", str(out)]
                    + SAMPLE + CROP)
    assert json.loads(out.read_text()) == rows
    resident, fed, synced, r = rows
    assert [x["feed"] for x in rows] == ["resident", "shard-fed", "shard-fed+host-sync", "ratio"]
    for x in (resident, fed, synced):
        assert x["images_per_s"] > 0 and x["tflops"] > 0 and 0.0 <= x["data_wait_fraction"] <= 1.0
    assert resident["data_wait_fraction"] == 0.0 and fed["data_wait_fraction"] > 0.0
    assert r["fed_over_resident"] == pytest.approx(fed["images_per_s"] / resident["images_per_s"])
    assert r["synced_over_resident"] == pytest.approx(synced["images_per_s"] / resident["images_per_s"])


def test_preprocess_bench_ours_vs_naive(tmp_path):
    from jobs.bench import preprocess

    out = tmp_path / "pre.json"
    preprocess.main(["--images", "20", "--workers", "1", "--shard-size", "10", "--repeats", "1",
                     "--cache", str(tmp_path / "images"), "--out", str(out)])
    naive, ours, summary = json.loads(out.read_text())
    assert (naive["method"], ours["method"], summary["method"]) == ("naive", "ours", "summary")
    for x in (naive, ours):
        assert x["images"] == 20 and x["images_per_s"] > 0 and x["cpu_bound_images_per_s"] > 0 and x["shard_mb"] > 0
    assert summary["speedup"] == pytest.approx(ours["images_per_s"] / naive["images_per_s"])
    assert summary["cpu_speedup"] == pytest.approx(ours["cpu_bound_images_per_s"] / naive["cpu_bound_images_per_s"])


def test_eval_benchmark_reports_images_per_second(capsys):
    from jobs.bench import eval as bench

    rows = bench.main(["--model", "A", "--width", "0.0625", "--image-size", "32", "--scale", "48", "--batch", "3",
                       "--classes", "5", "--iters", "1", "--warmup", "0", "--variants", "same,mixed,center"])
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["variant"] for r in printed] == ["same", "mixed", "center"]
    assert [r["shapes"] for r in rows] == [1, 3, 1]
    for r in rows:
        assert r["images_per_s"] > 0 and r["device"].startswith("CPU") and r["bench"] == "eval"
        assert r["images_per_s"] == pytest.approx(3 / r["seconds_per_batch"])
        assert r["vs_same"] == pytest.approx(r["images_per_s"] / rows[0]["images_per_s"])
    assert [r["mode"] for r in rows] == ["dense", "dense", "center"] and rows[0]["image_shape"] == "48x64"


def test_index_bench_cold_and_warm(tmp_path):
    from jobs.bench import index

    out = tmp_path / "index.json"
    rows = index.main(["--shards", "3", "--samples", "40", "--rounds", "2", "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [r["start"] for r in rows] == ["cold", "cold-disk", "warm"]
    for r in rows:
        assert r["bench"] == "index" and r["shards"] == 3 and r["entries"] == 40 and r["header_reads"] == 160
        assert r["seconds"] > 0 and r["cpu_seconds"] >= 0 and r["index_mb"] > 0 and r["tar_gb"] > 0
    assert len(rows[2]["seconds_by_round"]) == 2 and rows[2]["cache_kb"] > 0
    assert rows[2]["warm_over_cold"] == pytest.approx(rows[2]["seconds"] / rows[0]["seconds"])
