"""``scripts/gpu_check.sh --dry-run``: every section of the GPU check runs its real code at tiny shapes on the CPU, so
none of it rots between the rare sessions that have a GPU (where the same command runs at Qwen3-8B's shape)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_gpu_check_dry_run_exercises_every_section(tmp_path):
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out-dir", str(tmp_path)], cwd=REPO,
                          env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [path] = tmp_path.glob("dryrun_cpu_*.json")
    result = json.loads(path.read_text())
    sections = result["sections"]
    assert list(sections) == ["cuda_tests", "decoding", "training", "memory"]
    for name, s in sections.items():
        assert s["status"] == "ok", (name, s.get("error"), s.get("traceback"))

    tests = sections["cuda_tests"]  # without CUDA every test of tests/gpu is collected and skipped, with its reason
    assert tests["failed"] == 0 and tests["passed"] == 0 and tests["skipped"] >= 100, tests
    assert any("no CUDA device" in r for r in tests["skip_reasons"])

    dec, shape = sections["decoding"], result["shape"]
    vc = dec["verify_cost"]
    assert vc["widths"] == list(range(1, shape["verify_widths"] + 1)) and vc["rows"][-1] == shape["verify_rows"]
    assert vc["ratio"][0][0] == 1.0 and len(vc["ratio"]) == len(vc["rows"])
    assert list(dec["by_context"]) == [str(c) for c in shape["draft_contexts_tokens"]]
    assert all(c["draft_in_target_steps"] > 0 for c in dec["by_context"].values())
    assert set(dec["loop"]) == {"T0", "T1"} and all(abs(r["draft_share"] + r["verify_share"] + r["overhead_share"] - 1) < 1e-6
                                                    for r in dec["loop"].values())
    assert not dec["kernels"]["triton"] and 0 < dec["kernels"]["share_of_round_T1"] < 1
    assert all(set(v) == {"tau_2", "tau_3", "tau_5"} for v in dec["implied_speedup"].values())
    assert dec["reduced_vocab"]["draft_vocab"] == shape["draft_vocab"] and list(dec["reduced_vocab"]["by_context"]) == list(dec["by_context"])

    train = sections["training"]
    assert train["full_vocab"]["draft_vocab"] == shape["vocab"] and train["reduced_vocab"]["draft_vocab"] == shape["draft_vocab"]
    for r in (train["full_vocab"], train["reduced_vocab"]):
        assert r["flops_per_step"] > 0 and r["tokens_per_s"] > 0 and r["mfu"] is None  # a CPU has no bf16 peak on record

    mem = sections["memory"]
    assert [m["seq_tokens"] for m in mem["micro_batch"]] == shape["memory_seq_tokens"]
    assert set(mem["loss_chunking"]) >= {"chunked_peak_gib", "unchunked_peak_gib", "saved_gib"}

    page = path.with_suffix(".md").read_text()
    assert all(f"## {name} (ok" in page for name in sections)
