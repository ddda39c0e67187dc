"""bench/gpu_profile.py's spec arguments: a malformed spec is an argparse
error (exit status 2, a message), never a traceback on the GPU machine."""

import pytest

from bench.gpu_profile import parser


def test_specs_parse_to_shapes_and_counts():
    args = parser().parse_args(["--attention", "8b:256,1b:64:1024", "--engine", "1b:256",
                                "--prefill-attention", "8b:64:128", "--split-k", "256,64"])
    assert args.attention == [("llama-8b", 256), ("llama-1b", 64, 1024)]
    assert args.engine == [("llama-1b", 256)]
    assert args.prefill_attention == [("llama-8b", 64, 128)]
    assert args.split_k == [(256,), (64,)]


@pytest.mark.parametrize("argv, says", [
    (["--attention", "8b:256:x"], "tokens must be a whole number"),
    (["--attention", "8b"], "is not model:rows:tokens"),
    (["--engine", "3b:5"], "model '3b' is not one of"),
    (["--prefill-attention", "8b:64"], "is not model:rows:tokens"),
    (["--split-k", "99999"], "from 1 to 4,096"),
    (["--layers", "8b:-1"], "rows must be a whole number"),
    (["--engine", "8b:1:2:3"], "is not model:rows"),
])
def test_bad_specs_are_usage_errors(capsys, argv, says):
    with pytest.raises(SystemExit) as stop:
        parser().parse_args(argv)
    assert stop.value.code == 2 and says in capsys.readouterr().err
