"""`python -m pretrain.convert` refuses bad input in one `conversion error:` line (exit 2) before it
starts any rank or writes anything."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def convert(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "pretrain.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("case", ["truncated_safetensors", "missing_hf", "import_into_non_empty", "export_missing",
                                  "export_into_non_empty", "bad_argument"])
def test_bad_input_is_one_line_and_nothing_is_written(hf_dirs, tmp_path, case):
    out = tmp_path / "out"
    if case == "truncated_safetensors":
        hf = tmp_path / "hf"
        shutil.copytree(hf_dirs["dense"], hf)
        weights = hf / "model.safetensors"
        os.truncate(weights, weights.stat().st_size - 100)
        args, expected = ["import", "--hf", str(hf), "--out", str(out), "--tp", "2"], (
            f"{weights} is not a readable safetensors file (truncated or corrupt?)")
    elif case == "missing_hf":
        args, expected = ["import", "--hf", str(tmp_path / "nope"), "--out", str(out), "--tp", "2"], (
            f"{tmp_path / 'nope'} does not exist")
    elif case in ("import_into_non_empty", "export_into_non_empty"):
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        if case.startswith("import"):
            args = ["import", "--hf", str(hf_dirs["dense"]), "--out", str(out), "--tp", "2"]
        else:  # refused before the checkpoint is even looked at
            args = ["export", "--checkpoint", str(hf_dirs["dense"]), "--out", str(out)]
        expected = f"{out} exists and is not an empty folder"
    elif case == "export_missing":
        args, expected = ["export", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)], (
            f"{tmp_path / 'nope'} does not exist")
    else:
        args, expected = ["import", "--hf", str(hf_dirs["dense"]), "--out", str(out), "--tp", "two"], (
            "argument --tp: invalid int value: 'two'")
    proc = convert(*args)
    assert proc.returncode == 2, proc.stderr[-4000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("conversion error:")]
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-4000:]
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr
    assert "local processes" not in proc.stderr  # refused before torchrun started any rank
    if case.endswith("non_empty"):
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
