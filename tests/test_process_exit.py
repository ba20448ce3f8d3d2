"""Entry points exit with their stage's status every time, after their work is written."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from conftest import REPO
from test_training import env, tiny_cache, train_cmd  # noqa: F401 -- tiny_cache is a fixture

SCRIPT = textwrap.dedent("""
    import sys, threading, time
    from pathlib import Path
    from deepspec.process_exit import run_entry_point

    def writer():  # a straggler thread: joined before the process ends, so its file is complete
        time.sleep(0.5)
        Path(sys.argv[1]).write_text("written")

    def main():
        threading.Thread(target=writer, name="late-writer").start()
        {body}

    run_entry_point(main)
""")


@pytest.mark.parametrize("body,status", [("return None", 0), ("sys.exit(3)", 3), ("raise RuntimeError('boom')", 1),
                                         ("sys.exit('bad config: x')", 1)])
def test_exit_status_is_the_stages_and_threads_finish_first(tmp_path, body, status):
    out = tmp_path / "out.txt"
    proc = subprocess.run([sys.executable, "-c", SCRIPT.replace("{body}", body), str(out)], capture_output=True, text=True,
                          timeout=60, cwd=REPO, env=env())
    assert proc.returncode == status, proc.stderr
    assert out.read_text() == "written"
    if status == 1:
        assert "boom" in proc.stderr or "bad config: x" in proc.stderr


@pytest.mark.slow
def test_short_trainings_exit_zero_every_time(tiny_target, tiny_cache, tmp_path):  # noqa: F811
    """The demo once died with SIGABRT after training logged `done`: run short trainings repeatedly."""
    for i, precision in enumerate(["fp32", "bf16", "fp32", "bf16"]):
        cmd = train_cmd(tiny_target, tiny_cache, tmp_path / f"run{i}", "max_steps=2", "global_batch_size=2",
                        f"deepspeed.precision={precision}")
        proc = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=600, env=env())
        assert proc.returncode == 0, (i, precision, proc.returncode, proc.stderr[-3000:])
        assert (tmp_path / f"run{i}" / "result.json").exists() and (tmp_path / f"run{i}" / "export").is_dir()


@pytest.mark.parametrize("override,says", [
    ("drafter=nonexistent", "train: MissingConfigException: In 'train': Could not find 'drafter/nonexistent'"),
    ("max_steps=abc", "train: ConfigCompositionException: Error merging override max_steps=abc (ValidationError"),
    ("max_steps=-1", "  - max_steps=-1 must be >= 0"),
])
def test_a_config_the_cli_refuses_is_its_message_not_a_traceback(override, says):
    """Hydra's own errors (unknown group, bad override) and the stage's validation end in their message, status 1."""
    proc = subprocess.run([sys.executable, "train/train.py", override, "cache_dir=/nonexistent"], capture_output=True,
                          text=True, timeout=120, cwd=REPO, env=env())
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert says in proc.stderr, proc.stderr[-3000:]
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stderr[-3000:]


def test_a_dead_peer_is_recognised_only_in_a_collective_error():
    from deepspec.process_exit import peer_lost

    gloo = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [127.0.0.1]:50911: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging")
    assert peer_lost(gloo)
    assert not peer_lost(RuntimeError("DataLoader worker (pid 12) exited unexpectedly: Broken pipe"))
    assert not peer_lost(BrokenPipeError("Broken pipe"))
