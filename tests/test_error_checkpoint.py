"""The error checkpoint never overwrites a file, and a refused resume leaves its checkpoint as it was (issue 9, item 9).

Real processes (tests/scripts/dana_error.py, strategy="dana", devices=2): rank 0 raises mid-fit in a folder
that already holds ``dana-master-on-error.ckpt``; then a resume from the checkpoint it wrote, with another
algorithm, in the same folder, must be refused with a clear error and touch no file.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
from dana_error import Failing  # noqa: E402
from dana_runner import PYTHON, SCRIPTS, run  # noqa: E402

PRE_EXISTING = b"a file the user had here before; lightning-dana must not overwrite it\n"


def _run(root: Path, name: str, *args: str) -> tuple[int, str, dict | None]:
    out = root / f"{name}.json"
    rc, output, _ = run([PYTHON, str(SCRIPTS / "dana_error.py"), "--root", str(root), "--out", str(out), *args],
                        timeout=300)
    return rc, output, json.loads(out.read_text()) if out.exists() else None


def _digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.ckpt"))}


def test_error_checkpoint_never_overwrites_and_a_refused_resume_leaves_it_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "run"
    root.mkdir()
    existing = root / "dana-master-on-error.ckpt"
    existing.write_bytes(PRE_EXISTING)

    rc, output, r0 = _run(root, "fail", "--raise-step", "3")
    assert r0 is not None, output[-4000:]
    assert rc != 0 and r0["status"] == "error", r0
    assert r0["error_type"] == "InjectedFailure" and "injected failure" in r0["error"], r0
    assert existing.read_bytes() == PRE_EXISTING  # never overwritten
    written = root / "dana-master-on-error-1.ckpt"
    assert r0["error_checkpoint"] == str(written), r0
    assert "dana-master-on-error-1.ckpt" in r0["error"]  # the message says where the master's model is
    checkpoint = torch.load(written, weights_only=False)
    assert checkpoint["dana"]["algorithm"] == "dana"
    assert checkpoint["dana"]["master"]["version"] > 0
    model = Failing.load_from_checkpoint(written)
    assert all(math.isfinite(v) for p in model.parameters() for v in p.detach().reshape(-1).tolist())
    for name, value in model.state_dict().items():
        assert torch.equal(value, checkpoint["state_dict"][name]), name

    # resuming with another algorithm, in the same folder: refused clearly, and no file is touched
    before = _digests(root)
    rc, output, r0 = _run(root, "resume", "--resume", str(written), "--algorithm", "asgd")
    assert r0 is not None, output[-4000:]
    assert rc != 0 and r0["status"] == "error", r0
    assert r0["error_type"] == "MisconfigurationException", r0
    assert "algorithm='dana'" in r0["error"] and "'asgd'" in r0["error"], r0["error"]
    assert _digests(root) == before  # byte-identical, and no new error checkpoint written while restoring
    assert r0["error_checkpoint"] is None
    assert existing.read_bytes() == PRE_EXISTING
