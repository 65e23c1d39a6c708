"""FP8 numerics on real activations: per-layer relative error of the FP8 matmuls (nanocode.fp8)
against bf16 and fp32, forward and both backward matmuls, with the real upstream gradients.

    python -m bench.fp8                  # the latest base checkpoint in $NANOCODE_BASE_DIR
    python -m bench.fp8 --tag d2 --batch 8

No checkpoint yet? The depth-2 one of bench/results/cpu/fp8.md, a few minutes on a CPU:
    python -m nanocode.dataset --local --max-mb 20 && python -m scripts.tok_train --vocab-size 4096
    python -m scripts.base_train --depth 2 --max-seq-len 256 --device-batch-size 4 \\
        --total-batch-size 2048 --num-iterations 300 --eval-every 100 --eval-tokens 16384

One validation batch goes through the model in fp32, forward and backward of the loss; hooks keep
each block linear's input and output gradient, and the head's. Each matmul (y = x w^T, dx = dy w,
dw = dy^T x) is then redone three ways: fp32 (the reference), bf16 operands (what autocast does on a
GPU), and fp8_linear under bf16 autocast (e4m3 x and w, e5m2 dy, bf16 y, as a GPU run would call
it). The table has relative Frobenius errors ||got - ref|| / ||ref||. The MLP is one fused kernel,
so its two matmuls are rebuilt from its input x and output gradient dy: c_fc's input is x, c_proj's
is h = relu(z)^2 with z = x w_fc^T, and the gradient at c_fc's output is (dy w_proj) * 2 relu(z).
A second table takes each MLP whole, as base_train --fp8 runs it: fp8_relu2_mlp (the fused FP8
Triton kernel, interpreted on the CPU) and fp8_relu2_mlp_unfused (_scaled_mm, relu², _scaled_mm),
both under bf16 autocast, and the bf16 MLP, against fp32: y, dx, dw_fc and dw_proj.
Writes its section of bench/results/cpu/fp8.md (--out), keeping the file's other sections.
"""

import argparse
import os
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # the fused FP8 kernel on the CPU (before kernels)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.mfu import kernel_choice  # noqa: E402
from kernels.reference import relu2_mlp_reference  # noqa: E402
from nanocode.checkpoint import load_model  # noqa: E402
from nanocode.common import run_main  # noqa: E402
from nanocode.dataloader import DataLoader  # noqa: E402
from nanocode.fp8 import fp8_linear, fp8_relu2_mlp, fp8_relu2_mlp_unfused  # noqa: E402
from nanocode.gpt import SOFTCAP, norm  # noqa: E402

HEADING = "## Numerics: FP8 matmuls on real activations"
OUT = Path(__file__).resolve().parent / "results" / "cpu" / "fp8.md"


def capture(model, idx, targets):
    """[(name, x, w, dy)] for every block linear and the head: 2-D fp32 inputs, weights and output
    gradients of one forward and backward of the loss; and [(name, x, w_fc, w_proj, dy)] of the
    MLPs."""
    got, hooks = {}, []

    def keep(name, weight):
        def hook(module, args, out):
            got[name] = [args[0].detach().flatten(0, -2), weight.detach()]
            out.register_hook(lambda grad: got[name].append(grad.flatten(0, -2)))

        return hook

    def keep_head(module, args, out):  # the head reads norm(the last block's output)
        got["head"] = norm(out.detach().flatten(0, -2))

    for i, block in enumerate(model.transformer.h):
        for name in ("c_q", "c_k", "c_v", "c_proj"):
            linear = getattr(block.attn, name)
            hooks.append(linear.register_forward_hook(keep(f"{i}.attn.{name}", linear.weight)))
        hooks.append(block.mlp.register_forward_hook(keep(f"{i}.mlp", block.mlp.c_fc.weight)))
    hooks.append(model.transformer.h[-1].register_forward_hook(keep_head))
    model(idx, targets).backward()
    for hook in hooks:
        hook.remove()
    x, w = got.pop("head"), model.lm_head.weight.detach()
    logits = (x @ w.T).requires_grad_()  # dy of the head: the loss's gradient at the logits
    capped = SOFTCAP * torch.tanh(logits / SOFTCAP)
    loss = F.cross_entropy(capped, targets.flatten(), ignore_index=-1)
    rows, mlps = [], []
    for name, (x_in, w_in, dy) in got.items():
        if name.endswith("mlp"):  # the fused MLP: rebuild its two matmuls (docstring)
            w_proj = model.transformer.h[int(name.split(".")[0])].mlp.c_proj.weight.detach()
            z = x_in @ w_in.T
            rows.append((f"{name}.c_fc", x_in, w_in, (dy @ w_proj) * 2 * z.relu()))
            rows.append((f"{name}.c_proj", z.relu().square(), w_proj, dy))
            mlps.append((name, x_in, w_in, w_proj, dy))
        else:
            rows.append((name, x_in, w_in, dy))
    return rows + [("lm_head", x, w, torch.autograd.grad(loss, logits)[0])], mlps


def mlp_errors(x, w_fc, w_proj, dy):
    """Relative errors against fp32 of y, dx, dw_fc, dw_proj: fused FP8, unfused FP8, bf16."""

    def run(fn, x, w_fc, w_proj, amp=False):
        leaves = [t.detach().clone().requires_grad_() for t in (x, w_fc, w_proj)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            y = fn(*leaves)
        return [y, *torch.autograd.grad(y, leaves, dy.to(y.dtype))]

    ref = run(relu2_mlp_reference, x, w_fc, w_proj)
    with kernel_choice("triton"):  # as a GPU run calls it: bf16 x, fp32 weights, autocast
        fused = run(fp8_relu2_mlp, x.bfloat16(), w_fc, w_proj, amp=True)
    unfused = run(fp8_relu2_mlp_unfused, x.bfloat16(), w_fc, w_proj, amp=True)
    bf16 = run(relu2_mlp_reference, *(t.bfloat16() for t in (x, w_fc, w_proj)))
    return [rel(got[i], ref[i]) for i in range(4) for got in (fused, unfused, bf16)]


def matmuls(x, w, dy):
    """Per matmul (y, dx, dw): (fp32, from bf16 operands, from fp8_linear as a GPU run calls it)."""
    xb, wb, dyb = x.bfloat16(), w.bfloat16(), dy.bfloat16()
    x8, w8 = x.clone().requires_grad_(), w.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y8 = fp8_linear(x8, w8)
    y8.backward(dyb)
    fp32, bf16 = (x @ w.T, dy @ w, dy.T @ x), (xb @ wb.T, dyb @ wb, dyb.T @ xb)
    return list(zip(fp32, bf16, (y8, x8.grad, w8.grad)))


def rel(got, ref):
    """||got - ref||_F / ||ref||_F in float64: one number per matrix, not a max over elements,
    which a single near-zero reference element would blow up."""
    return ((got.double() - ref.double()).norm() / ref.double().norm()).item()


def predicted(a, b, u_a, u_b=2.0**-4):
    """The relative error of a @ b that tests/test_fp8.py's random-rounding model expects: 0.74
    sigma / ||a @ b|| (0.74: the measured sigma fraction on random data; e4m3 u = 2^-4)."""
    a, b = a.double(), b.double()
    # sum_k ||a[:, k]||² ||b[k, :]||²: with independent roundings of RMS u / sqrt(3) per operand,
    # (u_a² + u_b²) / 3 times this is the expected ||error||_F² (tests/test_fp8.py's docstring)
    terms = (a.square().sum(0) * b.square().sum(1)).sum()
    return (0.74 * ((u_a**2 + u_b**2) / 3 * terms).sqrt() / (a @ b).norm()).item()


def crest(t):
    """amax / rms: how much of the FP8 range tensorwise scaling leaves to the typical element."""
    return (t.abs().max() / t.square().mean().sqrt()).item()


def write_section(path, section):
    """Replace this script's section (its heading up to the next '## ') and keep the rest."""
    old = path.read_text() if path.exists() else "# FP8\n"
    head, _, rest = old.partition(HEADING)
    tail = rest[rest.find("\n## ") :] if "\n## " in rest else ""
    path.write_text(head.rstrip("\n") + "\n\n" + section + tail)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tag", default=None, help="base checkpoint tag (default: the latest)")
    p.add_argument("--batch", type=int, default=4, help="validation rows of the model's context")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args()
    torch.manual_seed(0)
    model, tokenizer, meta = load_model("base", "cpu", args.tag)
    T = model.config.sequence_len
    loader = DataLoader(tokenizer, args.batch, T, split="val", fim_rate=0.0, seed=0)
    idx, targets = next(loader)
    loader.close()
    cols = [f"{m}: {a} vs {b}" for m in ("y", "dx", "dw") for a, b in ((8, 32), (8, 16), (16, 32))]
    lines = [
        HEADING,
        "",
        f"`python -m bench.fp8`, torch {torch.__version__}, CPU. Checkpoint: base "
        f"`{meta['model_config']['n_layer']}` layers, step {meta.get('step')}, val bpb "
        f"{meta.get('val_bpb', float('nan')):.4f}; one validation batch of {args.batch} x {T} "
        "tokens. Relative Frobenius error, ||got - ref|| / ||ref||: 8 = FP8 (fp8_linear under "
        "bf16 autocast), 16 = bf16 operands, 32 = fp32 (the reference). x (M, K), w (N, K).",
        "",
        "| layer | M x K x N | " + " | ".join(cols) + " |",
        "|---|---|" + "---:|" * len(cols),
    ]
    model_check = [
        "",
        "The same FP8 errors (8 vs 32) beside what the random-rounding model of tests/test_fp8.py "
        "predicts for these operands (e4m3 u = 2^-4, e5m2 u = 2^-3), and each operand's crest "
        "factor amax / rms.",
        "",
        "| layer | crest x | crest w | crest dy | y | y model | dx | dx model | dw | dw model |",
        "|---|" + "---:|" * 9,
    ]
    with kernel_choice("torch"):  # the model in fp32 on the references
        linears, mlps = capture(model, idx, targets)
    for name, x, w, dy in linears:
        errs = []
        for fp32, bf16, fp8 in matmuls(x, w, dy):
            errs += [rel(fp8, fp32), rel(fp8, bf16), rel(bf16, fp32)]
        shape = f"{x.size(0)} x {x.size(1)} x {w.size(0)}"
        lines.append(f"| {name} | {shape} | " + " | ".join(f"{e:.4f}" for e in errs) + " |")
        e4m3, e5m2 = 2.0**-4, 2.0**-3  # the unit roundoff of each operand's format
        expected = [predicted(x, w.T, e4m3), predicted(dy, w, e5m2), predicted(dy.T, x, e5m2)]
        cells = [f"{crest(t):.1f}" for t in (x, w, dy)]
        cells += [f"{v:.4f}" for i in range(3) for v in (errs[3 * i], expected[i])]
        model_check.append(f"| {name} | " + " | ".join(cells) + " |")
    cols = [f"{g}: {k}" for g in ("y", "dx", "dw_fc", "dw_proj") for k in ("8", "8 unfused", "16")]
    fused = [
        "",
        "Each MLP whole, as base_train --fp8 runs it, against fp32: 8 = fp8_relu2_mlp (the fused "
        "FP8 kernel, interpreted), 8 unfused = fp8_relu2_mlp_unfused (_scaled_mm, relu², "
        "_scaled_mm), both under bf16 autocast; 16 = the MLP on bf16 operands.",
        "",
        "| MLP | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for name, *tensors in mlps:
        fused.append(f"| {name} | " + " | ".join(f"{e:.4f}" for e in mlp_errors(*tensors)) + " |")
    section = "\n".join(lines + model_check + fused) + "\n"
    print(section)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_section(args.out, section)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    run_main(main)
