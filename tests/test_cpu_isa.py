"""Each instruction-set build of the CPU kernels (baseline, AVX2, AVX-512) runs and agrees
with the float64 reference. The build is chosen once per process, so each runs in its own."""
import subprocess
import sys

import pytest
import torch

import unlearn_ext as ue

pytestmark = pytest.mark.skipif(not ue.backends()["cpu"].available, reason="needs the C++ CPU extension")

SCRIPT = r"""
import sys, torch, unlearn_ext as ue
from unlearn_ext import _C
torch.manual_seed(int(sys.argv[2]))
out = {"isa": _C.cpu_isa()}
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    s, t, t2 = (torch.randn(6, 3001) * 4 for _ in range(3))
    s[0, 5:] = float("-inf")
    y = torch.randint(0, 3001, (6,)); y[0] = 2; y[3] = -100
    for op, args in [("token_logprob", ()), ("cross_entropy", ()), ("forward_kl", (t,)), ("reverse_kl", (t,)),
                     ("rkld", (t, t2)), ("undial", (t,))]:
        x = s.to(dtype).clone().requires_grad_(True)
        v = getattr(ue, op)(x, *[a.to(dtype) for a in args], y, reduction="none", backend="cpu", temperature=1.3)
        v.backward(torch.linspace(-1, 1, 6))
        out[f"{op}-{dtype}"] = (x.detach().clone(), [a.to(dtype) for a in args], y, v.detach(), x.grad)
torch.save(out, sys.argv[1])
"""


def _supported():
    flags = open("/proc/cpuinfo").read() if sys.platform == "linux" else ""
    isas = ["base"]
    if " avx2 " in flags and " fma " in flags and " f16c " in flags:
        isas.append("avx2")
    if all(f" {f} " in flags for f in ("avx512f", "avx512bw", "avx512vl", "avx512dq")) and "avx2" in isas:
        isas.append("avx512")
    return isas


@pytest.mark.parametrize("isa", _supported())
def test_every_isa_build_matches_the_reference(isa, tmp_path, seed):
    path = tmp_path / "out.pt"
    env = {"UNLEARN_EXT_CPU_ISA": isa, "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-c", SCRIPT, str(path), str(seed)], check=True, env=env)
    results = torch.load(path, weights_only=True)
    assert results.pop("isa") == isa
    for key, (logits, teachers, labels, value, grad) in results.items():
        op = key.split("-")[0]
        x = logits.double().requires_grad_(True)
        ref = ue.reference.ROW_OPS[op](x, *[t.double() for t in teachers], labels, temperature=1.3)
        ref.backward(torch.linspace(-1, 1, 6, dtype=torch.float64))
        torch.testing.assert_close(value.double(), ref.detach(), rtol=1e-5, atol=1e-5, msg=lambda m: f"{key}: {m}")
        tol = 1e-5 if logits.dtype == torch.float32 else 2 ** -7
        torch.testing.assert_close(grad.double(), x.grad, rtol=tol, atol=1e-5 * x.grad.abs().max().item(),
                                   msg=lambda m: f"{key}: {m}")
