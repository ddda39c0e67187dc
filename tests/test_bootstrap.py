"""Import order never changes what runs: the CPU fast path calls its BLAS
through its own kernels, so `import mlx.core` (or a model file) before
`import engine` still gets it; models/ never imports engine; importing
engine is cheap (its public names load on first use)."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]

SCRIPT = """
import json, sys
{first}
from engine import LLM, SamplingParams
llm = LLM(sys.argv[1], kv_cache_bytes=16 << 20)
out = llm.generate([[5, 6, 7, 8, 9]], SamplingParams(temperature=0, max_tokens=12,
                   ignore_eos=True), use_tqdm=False)
print(json.dumps({{"fast": llm.engine.runner.host_forward is not None,
                  "tokens": out[0].outputs[0].token_ids}}))
"""


def run(first: str, model_dir) -> dict:
    done = subprocess.run([sys.executable, "-c", SCRIPT.format(first=first), str(model_dir)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_import_order_does_not_change_the_path_or_the_tokens(tiny_llama_dir):
    usual = run("import engine", tiny_llama_dir)
    assert usual["fast"]
    for first in ("import mlx.core", "import models.llama", "import mlx.nn; import models"):
        assert run(first, tiny_llama_dir) == usual, first


def test_models_never_import_engine():
    offenders = [p.relative_to(ROOT).as_posix() for p in (ROOT / "models").rglob("*.py")
                 if "import engine" in p.read_text() or "from engine" in p.read_text()]
    assert offenders == []


def test_importing_engine_loads_no_mlx():
    done = subprocess.run([sys.executable, "-c", "import sys, engine; "
                           "print('mlx.core' in sys.modules, 'engine.entrypoints.llm' in "
                           "sys.modules); engine.LLM; print('engine.entrypoints.llm' in "
                           "sys.modules)"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.stdout.split() == ["False", "False", "True"], done.stderr
