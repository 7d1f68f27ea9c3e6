"""Peer benchmark, PyTorch side: Torch-Pruning on the CIFAR ResNet-56, L1 magnitude, ~50% MACs.

A standalone script for an interpreter that has `torch` and `torch-pruning` (the
`bench_peer_pruning` job runs it as a subprocess; jaxcompress itself never imports
it and never depends on torch). torch is imported inside `main()` only, so this file
can be read or imported where torch is missing.

    python3 -m venv .venv-torch && .venv-torch/bin/pip install torch==2.13.0 torch-pruning
    .venv-torch/bin/python jaxcompress/bench/peer_torch_pruning.py --flops-fraction 0.5

What it does:

1. Builds jaxcompress's `resnet56` in PyTorch, layer for layer (`jaxcompress.models.resnet`):
   3x3 stem conv 16 + BN + ReLU; 3 stages x 9 BasicBlocks (16/32/64 channels), each
   conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU; the first block of stages
   2 and 3 has stride 2 on its first conv and a 1x1 stride-2 conv + BN projection
   shortcut (option B); global average pool; Linear(64, 10). Convs have no bias.
   The one difference: for the stride-2 3x3 convs PyTorch pads (1, 1) where XLA's
   "SAME" pads (0, 1); shapes, parameters and MACs are identical.
   Weights: `--weights file.npz` (state_dict names, e.g. the jaxcompress job's
   initialisation) or PyTorch's default initialisation with `--seed`.
2. Finds, by bisection, the smallest uniform channel pruning ratio whose pruned network
   has at most `--flops-fraction` of the dense MACs (conv + linear multiply-accumulates,
   counted with forward hooks exactly as `jaxcompress.cost` counts them: no bias, BN,
   ReLU or pooling; `tp.utils.count_ops_and_params` totals, which add those, are
   reported beside them).
3. Times the pruning call: `tp.pruner.MetaPruner(...)` (the dependency-graph build, a
   traced forward pass) + `pruner.step()` (importance + channel removal), on a fresh
   copy of the dense network each repeat; `MagnitudeImportance(p=1)` (group L1),
   `global_pruning=False` (the same ratio for every group), the classifier's outputs
   left alone (`ignored_layers`). Every coupled group is pruned, residual streams
   included (the dependency graph ties each stream's producers and consumers).
4. Measures CPU inference latency of dense and pruned, batch `--batch-size`,
   `torch.no_grad()`, eval mode, `torch.set_num_threads(--threads or all cores)`:
   warm-up, then `--rounds` interleaved rounds of `--calls` calls each, medians; in
   PyTorch's default NCHW layout and in channels_last (NHWC, oneDNN's fast path).

Prints one JSON line on stdout (progress goes to stderr).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time


def _log(msg: str) -> None:
    print(f"[peer_torch_pruning] {msg}", file=sys.stderr, flush=True)


def build_resnet(torch, nn, depth: int = 56, num_classes: int = 10):
    """jaxcompress's CIFAR ResNet (`jaxcompress.models.resnet.ResNet`) in PyTorch.

    Module names follow the Flax ones (`stage2_block0_a_conv` -> `stage2_block0.a_conv`),
    so a state_dict converted from the Flax variables loads by name.
    """
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6

    class Block(nn.Module):
        def __init__(self, cin, cout, stride, proj):
            super().__init__()
            self.a_conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.a_bn = nn.BatchNorm2d(cout)
            self.b_conv = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.b_bn = nn.BatchNorm2d(cout)
            if proj:
                self.proj_conv = nn.Conv2d(cin, cout, 1, stride, 0, bias=False)
                self.proj_bn = nn.BatchNorm2d(cout)
            self.proj = proj

        def forward(self, x):
            y = torch.relu(self.a_bn(self.a_conv(x)))
            y = self.b_bn(self.b_conv(y))
            s = self.proj_bn(self.proj_conv(x)) if self.proj else x
            return torch.relu(s + y)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem_conv = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
            self.stem_bn = nn.BatchNorm2d(16)
            self.block_names = []
            cin = 16
            for s, width in enumerate((16, 32, 64)):
                for b in range(n):
                    name = f"stage{s + 1}_block{b}"
                    stride = 2 if (b == 0 and s > 0) else 1
                    setattr(self, name, Block(cin, width, stride, proj=(b == 0 and s > 0)))
                    self.block_names.append(name)
                    cin = width
            self.classifier = nn.Linear(64, num_classes)
            for m in self.modules():  # He fan-out init, as jaxcompress's conv_init
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

        def forward(self, x):
            x = torch.relu(self.stem_bn(self.stem_conv(x)))
            for name in self.block_names:
                x = getattr(self, name)(x)
            return self.classifier(x.mean((2, 3)))

        def widths(self):
            """jaxcompress's widths layout: stage streams, then each block's inner width."""
            blocks = [getattr(self, nm) for nm in self.block_names]
            streams = [self.stem_conv.out_channels] + [blocks[i * n].b_conv.out_channels for i in (1, 2)]
            return streams + [b.a_conv.out_channels for b in blocks]

    return ResNet()


def conv_linear_macs(torch, nn, model, example) -> int:
    """Multiply-accumulates of every Conv2d and Linear per image (biases not counted)."""
    total = [0]

    def hook(m, inputs, out):
        if isinstance(m, nn.Conv2d):
            per_out = (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]
            total[0] += per_out * out[0].numel()
        else:
            total[0] += m.in_features * m.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in handles:
            h.remove()
    return int(total[0])


def interleaved_ms(torch, runs: dict, args) -> dict:
    """{name: median ms} of each `name -> (module, input)` under `torch.no_grad()`:
    `--warmup` calls each, then `--rounds` rounds of `--calls` calls each, in alternation."""
    samples = {k: [] for k in runs}
    with torch.no_grad():
        for m, inp in runs.values():
            for _ in range(args.warmup):
                m(inp)
        for _ in range(args.rounds):
            for k, (m, inp) in runs.items():
                for _ in range(args.calls):
                    t0 = time.perf_counter()
                    m(inp)
                    samples[k].append(time.perf_counter() - t0)
    return {k: 1e3 * statistics.median(v) for k, v in samples.items()}


def time_convs(torch, args) -> dict:
    """{"HWxC": {"nchw": ms, "channels_last": ms}}: one 3x3 C -> C conv (stride 1, padding 1,
    no bias) at batch `--batch-size`, eval, no_grad; warm-up, then interleaved medians."""
    out = {}
    for shape in args.conv_shapes.split(","):
        hw, c = (int(v) for v in shape.split("x"))
        conv = torch.nn.Conv2d(c, c, 3, 1, 1, bias=False).eval()
        x = torch.randn(args.batch_size, c, hw, hw)
        cl = torch.channels_last
        runs = {"nchw": (conv, x), "channels_last": (copy.deepcopy(conv).to(memory_format=cl),
                                                     x.contiguous(memory_format=cl))}
        out[shape] = interleaved_ms(torch, runs, args)
    return out


def params_count(model) -> int:
    return int(sum(p.numel() for p in model.parameters()))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=56)
    p.add_argument("--flops-fraction", type=float, default=0.5)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=3)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--prune-repeats", type=int, default=5)
    p.add_argument("--bisect-iters", type=int, default=16)
    p.add_argument("--threads", type=int, default=0, help="0: all cores (os.cpu_count())")
    p.add_argument("--weights", default=None, help="npz of state_dict tensors (else default init, --seed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--check", action="store_true", help="only import torch + torch_pruning, print versions")
    p.add_argument("--conv-shapes", default="", help="only time single 3x3 convs: 'HWxC,...' (C -> C channels, "
                   "stride 1, no bias), NCHW and channels_last, at --batch-size")
    args = p.parse_args(argv)

    import numpy as np
    import torch
    import torch.nn as nn
    import torch_pruning as tp

    from importlib import metadata
    versions = dict(torch_version=torch.__version__, torch_pruning_version=metadata.version("torch-pruning"),
                    python=platform.python_version())
    if args.check:
        print(json.dumps(versions), flush=True)
        return versions

    threads = args.threads or os.cpu_count()
    torch.set_num_threads(threads)
    if args.conv_shapes:
        result = dict(**versions, threads=threads, conv_ms=time_convs(torch, args))
        print(json.dumps(result), flush=True)
        return result
    torch.manual_seed(args.seed)
    dense = build_resnet(torch, nn, args.depth).eval()
    weights_source = f"torch default init, seed {args.seed} (He fan-out convs)"
    if args.weights:
        with np.load(args.weights) as f:
            state = {k: torch.from_numpy(np.ascontiguousarray(f[k])) for k in f.files}
        missing, unexpected = dense.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing or unexpected:
            raise SystemExit(f"--weights {args.weights}: missing {missing[:5]}, unexpected {unexpected[:5]}")
        weights_source = f"loaded from {os.path.basename(args.weights)}"
    example = torch.randn(1, 3, 32, 32)
    macs_dense = conv_linear_macs(torch, nn, dense, example)
    params_dense = params_count(dense)

    def importance():
        return tp.importance.MagnitudeImportance(p=1)

    def prune(ratio):
        """(pruned model, build seconds, step seconds) for a fresh copy of the dense net."""
        model = copy.deepcopy(dense)
        t0 = time.perf_counter()
        pruner = tp.pruner.MetaPruner(model, example, importance=importance(), pruning_ratio=ratio,
                                      global_pruning=False, ignored_layers=[model.classifier])
        t1 = time.perf_counter()
        pruner.step()
        t2 = time.perf_counter()
        return model, t1 - t0, t2 - t1

    # Smallest pruning ratio meeting the MACs budget (the fraction is monotone in the ratio).
    t_search = time.perf_counter()
    cache = {}

    def fraction(ratio):
        if ratio not in cache:
            cache[ratio] = conv_linear_macs(torch, nn, prune(ratio)[0], example) / macs_dense
        return cache[ratio]

    lo, hi = 0.0, 0.95
    if fraction(hi) > args.flops_fraction:
        raise SystemExit(f"pruning ratio {hi} still leaves {fraction(hi):.1%} of the MACs")
    for _ in range(args.bisect_iters):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if fraction(mid) <= args.flops_fraction else (mid, hi)
    ratio = hi
    search_seconds = time.perf_counter() - t_search
    _log(f"pruning ratio {ratio:.5f} -> {fraction(ratio):.4f} of the MACs ({search_seconds:.1f} s search)")

    builds, steps, pruned = [], [], None
    for _ in range(args.prune_repeats):
        pruned, b, s = prune(ratio)
        builds.append(b)
        steps.append(s)
    pruned.eval()
    totals = [b + s for b, s in zip(builds, steps)]
    rest = lambda v: v[1:] if len(v) > 1 else v
    macs_pruned = conv_linear_macs(torch, nn, pruned, example)
    params_pruned = params_count(pruned)
    tp_dense = tp.utils.count_ops_and_params(dense, example)
    tp_pruned = tp.utils.count_ops_and_params(pruned, example)

    x = torch.randn(args.batch_size, 3, 32, 32)
    cl = torch.channels_last
    x_cl = x.contiguous(memory_format=cl)
    nets = {"dense": (dense, x), "pruned": (pruned, x),  # NCHW (PyTorch's default) and channels_last (NHWC)
            "dense_channels_last": (copy.deepcopy(dense).to(memory_format=cl), x_cl),
            "pruned_channels_last": (copy.deepcopy(pruned).to(memory_format=cl), x_cl)}
    with torch.no_grad():
        out = pruned(x[:2])
    assert tuple(out.shape) == (2, 10), out.shape
    lat = interleaved_ms(torch, nets, args)
    result = dict(
        library="torch-pruning", **versions, model=f"resnet{args.depth}", threads=threads,
        weights=weights_source,
        method="tp.pruner.MetaPruner, MagnitudeImportance(p=1) (group L1: mean over the coupled layers, "
               "mean-normalised), global_pruning=False, ignored_layers=[classifier]",
        pruning_ratio=ratio, flops_budget=args.flops_fraction,
        macs_dense=macs_dense, macs_pruned=macs_pruned, macs_fraction=macs_pruned / macs_dense,
        params_dense=params_dense, params_pruned=params_pruned, params_fraction=params_pruned / params_dense,
        tp_count_ops=dict(dense=float(tp_dense[0]), pruned=float(tp_pruned[0])),
        widths_dense=dense.widths(), widths=pruned.widths(),
        search_seconds=search_seconds,
        prune_seconds=dict(first=totals[0], median=statistics.median(rest(totals)),
                           build_first=builds[0], build_median=statistics.median(rest(builds)),
                           step_first=steps[0], step_median=statistics.median(rest(steps)),
                           repeats=args.prune_repeats),
        batch_size=args.batch_size, rounds=args.rounds, calls=args.calls,
        latency_ms=lat, latency_ratio=lat["pruned"] / lat["dense"], speedup=lat["dense"] / lat["pruned"],
        speedup_channels_last=lat["dense_channels_last"] / lat["pruned_channels_last"],
        loadavg=list(os.getloadavg()),
    )
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
