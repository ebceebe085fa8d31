"""The benchmark harness's pure parts: statistics, run order, results files, BENCHMARKS.md.

Nothing here is timed: the benchmarks themselves run with `make bench`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import harness  # noqa: E402
from benchmarks.launch import top_imports  # noqa: E402

MACHINE = {"nproc": 2, "cpu_model": "Test CPU", "torch": "2.x", "torch_threads": 2,
           "python": "3.11", "platform": "linux", "loadavg_at_start": [1.0, 1.0, 1.0]}


def test_median_spread_of_odd_and_even_counts():
    s = harness.median_spread([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
    s = harness.median_spread([4.0, 1.0, 2.0, 3.0])
    assert s["median"] == 2.5
    assert s["q1"] == pytest.approx(1.75) and s["q3"] == pytest.approx(3.25)
    single = harness.median_spread([5.0])
    assert single["q1"] == single["q3"] == single["median"] == 5.0


def test_median_spread_refuses_no_values():
    with pytest.raises(ValueError, match="at least one"):
        harness.median_spread([])


def test_ratios_are_paired_b_over_a():
    assert harness.ratios([2.0, 4.0], [1.0, 8.0]) == [0.5, 2.0]
    with pytest.raises(ValueError, match="differ in length"):
        harness.ratios([1.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="zero"):
        harness.ratios([0.0], [1.0])


def test_alternating_order_reverses_every_other_repetition():
    assert harness.alternating(["A", "B"], 3) == [(0, "A"), (0, "B"), (1, "B"), (1, "A"),
                                                   (2, "A"), (2, "B")]
    with pytest.raises(ValueError, match="repetitions=0"):
        harness.alternating(["A"], 0)


def test_run_alternating_keeps_values_per_side_in_repetition_order():
    calls = []

    def side(name, values):
        it = iter(values)

        def call():
            calls.append(name)
            return next(it)
        return call

    out = harness.run_alternating({"A": side("A", [1, 2]), "B": side("B", [10, 20])}, 2)
    assert out == {"A": [1.0, 2.0], "B": [10.0, 20.0]}
    assert calls == ["A", "B", "B", "A"]


def test_cpu_model_reads_proc_cpuinfo_text():
    text = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) X\n"
    assert harness.cpu_model(text) == "Intel(R) Xeon(R) X"


def test_results_json_shape_and_markdown(tmp_path):
    obj = harness.result("train_throughput", "1. Training", command="make bench",
                         machine_info=MACHINE, settings={"N": 64},
                         rows=[{"side": "plain", "img/s": 12.3456}],
                         summary={"ratio": harness.median_spread([0.9, 1.0, 1.1])},
                         notes=["small on purpose"])
    path = harness.write_result(obj, tmp_path)
    assert path.name == "train_throughput.json"
    loaded = json.loads(path.read_text())
    assert set(harness.RESULT_KEYS) <= set(loaded)
    assert loaded["rows"][0]["img/s"] == 12.3456
    text = harness.markdown([loaded], "# Benchmarks")
    assert "`make bench`" in text and "2 cores" in text and "Test CPU" in text
    assert "| plain | 12.35 |" in text
    assert "ratio = 1 (0.9-1.1)" in text
    assert "- small on purpose" in text


def test_results_refuse_bad_names_and_missing_keys(tmp_path):
    with pytest.raises(ValueError, match="benchmark name"):
        harness.result("../x", "t", command="c", machine_info=MACHINE, settings={}, rows=[],
                       summary={})
    with pytest.raises(ValueError, match="lacks keys: rows"):
        harness.write_result({k: None for k in harness.RESULT_KEYS if k != "rows"}, tmp_path)


def test_top_imports_parses_python_importtime_output():
    stderr = ("import time: self [us] | cumulative | imported package\n"
              "import time:       100 |        150 |   json.decoder\n"
              "import time:        20 |       9000 | torch\n"
              "import time:        30 |         40 | click\n")
    assert top_imports(stderr, 2) == [("torch", 9000), ("json.decoder", 150)]


def test_cli_startup_ratio_pairs_each_compress_with_the_same_repetitions_floor():
    from benchmarks import cli

    values = {cli.COMPRESS: [6.0, 9.0, 5.0], cli.IMPORT_TORCH: [3.5, 4.0, 4.5],
              cli.ENCODE: [0.5, 0.5, 0.5]}
    assert cli.target_ratios(values) == [1.5, 2.0, 1.0]
    rows, summary = cli.summarize(values)
    assert [r["side"] for r in rows] == [cli.COMPRESS, cli.IMPORT_TORCH, cli.ENCODE,
                                         "import torch + encode (sum)"]
    assert (rows[0]["median s"], rows[0]["min s"], rows[0]["max s"]) == (6.0, 5.0, 9.0)
    assert rows[3]["median s"] == 4.5
    ratio = summary["compress / (import torch + encode)"]
    assert (ratio["median"], ratio["min"], ratio["max"]) == (1.5, 1.0, 2.0)
    assert (summary["target"], summary["verdict"]) == ("<= 1.5", "met")  # at the target: met
    assert cli.summarize(values, target=1.4)[1]["verdict"] == "MISSED"
    with pytest.raises(ValueError):
        cli.target_ratios({**values, cli.ENCODE: [0.5]})


def test_cli_startup_sums_import_self_times_by_top_level_package():
    from benchmarks import cli

    stderr = ("import time: self [us] | cumulative | imported package\n"
              "import time:   2000000 |    2000000 |     torch._C\n"
              "import time:    500000 |    2600000 |   torch\n"
              "import time:    300000 |     300000 |       scipy.stats\n"
              "import time:     50000 |    2950000 | compressai\n"
              "not an import line\n")
    assert cli.import_self_seconds(stderr) == [("torch", 2.5), ("scipy", 0.3),
                                               ("compressai", 0.05)]
    assert cli.import_self_seconds(stderr, 1) == [("torch", 2.5)]


def test_cli_startup_runs_the_compress_the_user_types(tmp_path):
    from benchmarks import cli

    from taskcodec.cli.main import cli as taskcodec_cli

    image = tmp_path / "kodim01.png"
    image.write_bytes(b"")
    argv = cli.compress_command(["taskcodec"], image, Path("best.pt"), tmp_path / "out.tcd")
    assert argv == ["taskcodec", "compress", str(image), "-o", str(tmp_path / "out.tcd"),
                    "--checkpoint", "best.pt"]
    # A command taskcodec has, with the options it knows, in the meaning the benchmark means.
    parsed = taskcodec_cli.commands[argv[1]].make_context(argv[1], argv[2:]).params
    assert (parsed["image"], parsed["output"], parsed["checkpoint"]) == (
        image, tmp_path / "out.tcd", "best.pt")


def test_cpu_meters_read_a_busy_process_group_and_a_busy_thread():
    """The /proc readers benchmark 1 uses to say what the server and the logger cost."""
    import os
    import subprocess
    import threading

    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
    child = subprocess.Popen([sys.executable, "-c", spin + "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE, start_new_session=True)
    try:
        pgid = os.getpgid(child.pid)
        deadline = 0
        while harness.group_cpu_seconds(pgid) < 0.5 and deadline < 200:
            threading.Event().wait(0.05)
            deadline += 1
        assert harness.group_cpu_seconds(pgid) >= 0.5
    finally:
        child.communicate(b"")
    assert harness.group_cpu_seconds(pgid) == 0.0  # only live members count: none left

    spun, done = threading.Event(), threading.Event()
    ids = []

    def busy():
        import time
        ids.append(threading.get_native_id())
        t = time.thread_time()
        while time.thread_time() - t < 0.4:
            pass
        spun.set()
        done.wait()

    thread = threading.Thread(target=busy)
    thread.start()
    assert spun.wait(60)
    assert harness.thread_cpu_seconds(ids[0]) >= 0.35
    assert harness.thread_cpu_seconds(threading.get_native_id()) > 0  # the caller's own thread
    done.set()
    thread.join()
    assert harness.thread_cpu_seconds(2**30) == 0.0  # no such thread (above pid_max): no error
