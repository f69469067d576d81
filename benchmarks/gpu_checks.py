"""GPU checks of the adapters that CPU tests cannot make: the torch optimizer on CUDA (fused
Adam) against the same optimizer on CPU, through train_step and the canonical state.

    python benchmarks/gpu_checks.py
"""

from __future__ import annotations

import numpy as np

from mlperf_tutor import frameworks, workloads
from mlperf_tutor.core.parity import STEP_RTOL


def main() -> None:
    torch = frameworks.get("torch")
    torch.pin_precision()
    wl = workloads.get("gpt3")
    cfg = wl.config("tiny", lr=1e-3)
    runs = {}
    for device in ("cpu", "cuda"):
        model = wl.build("torch", cfg, weights=wl.init_canonical(cfg, seed=1)).to(device)
        optimizer = torch.make_optimizer(*wl.optimizer(cfg), model)
        losses = [
            torch.train_step(model, optimizer, wl.synthetic_batch(cfg, batch_size=1, seed=s))
            for s in range(5)
        ]
        runs[device] = (losses, torch.to_canonical(model), optimizer.state_dict())
        print(device, type(optimizer.native).__name__, optimizer.native.defaults["fused"])
    (l_cpu, p_cpu, s_cpu), (l_gpu, p_gpu, s_gpu) = runs["cpu"], runs["cuda"]
    rel = max(
        np.linalg.norm(p_gpu[k] - p_cpu[k]) / max(np.linalg.norm(p_cpu[k]), 1e-30) for k in p_cpu
    )
    state = max(
        np.linalg.norm(s_gpu[k] - s_cpu[k]) / max(np.linalg.norm(s_cpu[k]), 1e-30)
        for k in s_cpu
        if k != "step"
    )
    print(
        f"losses max-abs {np.abs(np.array(l_gpu) - l_cpu).max():.1e}; parameters rel {rel:.1e};"
        f" Adam state rel {state:.1e}; steps {s_cpu['step']} / {s_gpu['step']}"
    )
    assert rel <= STEP_RTOL and state <= STEP_RTOL and int(s_gpu["step"]) == int(s_cpu["step"]) == 5
    # The CPU state loaded into a fused CUDA optimizer continues the CPU run.
    batch = wl.synthetic_batch(cfg, batch_size=1, seed=5)
    model = wl.build("torch", cfg, weights=p_cpu).to("cuda")
    optimizer = torch.make_optimizer(*wl.optimizer(cfg), model)
    optimizer.load_state_dict(s_cpu)
    torch.train_step(model, optimizer, batch)
    cpu_model = wl.build("torch", cfg, weights=p_cpu)
    cpu_optimizer = torch.make_optimizer(*wl.optimizer(cfg), cpu_model)
    cpu_optimizer.load_state_dict(s_cpu)
    torch.train_step(cpu_model, cpu_optimizer, batch)
    a, b = torch.to_canonical(model), torch.to_canonical(cpu_model)
    moved = max(np.linalg.norm(a[k] - b[k]) / max(np.linalg.norm(b[k]), 1e-30) for k in b)
    print(f"CPU state resumed on CUDA (fused): parameters rel {moved:.1e}")
    assert moved <= STEP_RTOL


if __name__ == "__main__":
    main()
