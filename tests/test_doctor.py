"""deepspec-doctor: every probe reported, a broken environment is a one-line problem and exit 1, never a traceback."""
from __future__ import annotations

import json
import subprocess
import sys

from deepspec import doctor


def test_doctor_reports_this_machine_as_json():
    proc = subprocess.run([sys.executable, "-m", "deepspec.doctor", "--json", "--runs-dir", "runs/doctor-check"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout)
    assert info["precision_auto"] in ("fp32", "bf16") and info["deepspeed"] and info["problems"] == []
    assert info["next"].startswith("scripts/demo.sh")


def test_a_missing_component_is_a_problem_not_a_traceback(monkeypatch, tmp_path, capsys):
    real = doctor._version
    monkeypatch.setattr(doctor, "_version", lambda m: None if m == "deepspeed" else real(m))
    monkeypatch.setattr(doctor, "DEMO_DISK_GB", 1e9)
    assert doctor.main(["--runs-dir", str(tmp_path / "a" / "b")]) == 1
    out = capsys.readouterr().out
    assert "PROBLEM: deepspeed cannot be imported" in out and "GB free under" in out
    assert out.strip().endswith("next: fix the problems above, then run: deepspec-doctor")
