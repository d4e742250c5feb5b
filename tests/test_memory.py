"""The chunked backend never holds an N x N matrix: peak RSS of a subprocess stays far below one."""
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def extra_peak_bytes(backend: str, n: int, d: int) -> int:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run([sys.executable, "-m", "tests.memory_probe", backend, str(n), str(d)], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=600, check=True)
    return int(result.stdout.strip().splitlines()[-1])


def test_probe_sees_the_reference_square_matrices():
    """Control: the probe must catch B x B temporaries, or the chunked check below proves nothing."""
    n = 2048
    extra = extra_peak_bytes("reference", n, 64)
    print(f"reference N={n}: extra peak {extra / 2**20:.1f} MiB")
    assert extra > 8 * n * n * 4


def test_chunked_peak_memory_far_below_one_square_matrix():
    """The chunked working set is bounded (kernels.chunked.BLOCK_BYTES, 64 MiB), not a function of N x N: at
    N = 12288 half of one N x N fp32 matrix is 288 MiB, several times what the blocks take."""
    n, d = 12288, 64
    extra = extra_peak_bytes("chunked", n, d)
    square = n * n * 4
    print(f"chunked N={n}: extra peak {extra / 2**20:.1f} MiB vs one N x N fp32 matrix {square / 2**20:.0f} MiB")
    assert extra < square / 2  # any one (N, N) fp32 temporary would break this
