"""Runtime modes vs mlx_lm.generate on held-out prompts (tok/s ratios, MACs, acceptance, agreement, energy)."""
from __future__ import annotations

import json
import sys


def add_arguments(p):
    p.add_argument("--run", default=None, help="finished run with the runtime stage (default runs/latest)")
    p.add_argument("--model", default=None, help="backbone directory (default: the one the run's heads were made on)")
    p.add_argument("--prompts", type=int, default=3, help="held-out prompts (plus one over 600 tokens; default 3)")
    p.add_argument("--new-tokens", type=int, default=32, help="tokens decoded per prompt and mode (default 32)")
    p.add_argument("--lossy-prompts", type=int, default=1, help="prompts the lossy modes also decode (default 1)")
    from agp.energy.meter import CHOICES
    p.add_argument("--energy", default="auto", choices=CHOICES,
                   help="energy meter around each run's decode: powermetrics (macOS, needs sudo), rapl (Linux), "
                        "cpu (CPU-seconds proxy); auto picks the best available (default auto)")
    p.add_argument("--controller-on", default="mlx", choices=("mlx", "CPU_ONLY", "CPU_AND_GPU", "CPU_AND_NE"),
                   help="also run the routed loop with the controller served from its Core ML package on these "
                        "compute units, against the MLX controller (macOS; export it first with "
                        "`agp export coreml --heads controller --positions 1`)")
    p.add_argument("--json", action="store_true", help="print the table as JSON")


def main(args) -> int:
    from agp import runs
    from agp.backbone import load
    from agp.energy.meter import choose
    from agp.errors import AGPError
    from agp.runtime import heads as H
    from agp.train import runtime as R

    if args.prompts < 1 or args.new_tokens < 1:
        raise AGPError("--prompts and --new-tokens must be at least 1")
    energy = choose(args.energy)
    if energy[1]["unavailable"]:
        print(f"energy unavailable: {energy[1]['unavailable']}", file=sys.stderr)   # before minutes of benchmark
    run = runs.Run(args.run) if args.run else runs.latest_run()
    meta = H.backbone_source(run)
    bb = load(args.model or meta.get("model"), adapter=meta.get("adapter_dir"))
    mode = "routed" if run.stage("controller").get("status") == "done" else "speculative"
    heads = H.load(run, bb, mode)
    sidecar = sidecar_heads(run, heads, args.controller_on)      # refused before minutes of benchmark
    cfg = R.RuntimeArgs(bench_prompts=args.prompts, bench_new_tokens=args.new_tokens, lossy_prompts=args.lossy_prompts,
                        draft_max=meta.get("draft_max", 4), draft_min_confidence=meta.get("draft_min_confidence", 0.3))
    recorded = (run.stage("runtime").get("metrics") or {}).get("config") or {}
    cfg.long_prompt_tokens = int(recorded.get("long_prompt_tokens", cfg.long_prompt_tokens))   # as the stage did
    prompts = R.bench_prompts(bb, R.source_rows(run), cfg)
    bench = R.benchmark(bb, heads, prompts, cfg, energy=energy)
    loops = None
    if sidecar is not None:
        from agp.ane.sidecar import compare_loops
        loops = compare_loops(bb, heads, sidecar, prompts[:max(1, args.lossy_prompts)], args.new_tokens, energy[0])
    if args.json:
        print(json.dumps({"table": bench.table, "profile": bench.profile, "energy": bench.energy,
                          "controller_sidecar": loops}, indent=2))
        return 0
    print_modes(bench, args.new_tokens)
    print_energy(bench)
    if loops:
        print(f"routed loop, controller on Core ML {args.controller_on} vs on MLX (tok/s ratio, same tokens): " + "; ".join(
            f"{r['prompt']} {r['sidecar_speedup']:.2f} {r['same_tokens']['agreement']:.3f}" for r in loops))
    return 0


def print_modes(bench, new_tokens: int) -> None:
    """The mode table: speed against mlx-lm, cost and agreement against full depth, then the profile."""
    names = ", ".join(f"{p['name']}={p['tokens']}" for p in bench.prompts)
    print(f"prompts: {names}; {new_tokens} new tokens")
    print(f"{'mode':<26}{'tok/s x mlx-lm':>15}{'  per prompt':<48}{'MACs x full':>13}{'reads x full':>14}"
          f"{'agree':>8}{'accept':>8}{'tok/round':>10}")
    f = lambda x, s="{:.3f}": "-" if x is None else s.format(x)  # noqa: E731
    for r in bench.table:
        per = " ".join(f"{v:.2f}" for v in r["tok_s_ratio_per_prompt"].values())
        print(f"{r['mode']:<26}{r['tok_s_ratio_vs_mlx_lm']:>15.2f}{'  ' + per:<48}{f(r['mac_ratio_vs_full']):>13}"
              f"{f(r['read_ratio_vs_full']):>14}{r['agreement_vs_full']:>8.3f}{f(r['acceptance'], '{:.2f}'):>8}"
              f"{f(r['tokens_per_round'], '{:.2f}'):>10}")
    spec = next((r for r in bench.table if r["mode"] == "speculative"), None)
    if spec and spec["acceptance_per_prompt"]:
        print("speculative per prompt (tok/s x mlx-lm, acceptance, tokens/round): " + "; ".join(
            f"{k} {spec['tok_s_ratio_per_prompt'][k]:.2f} {f(v, '{:.2f}')} {f(spec['tokens_per_round_per_prompt'][k], '{:.2f}')}"
            for k, v in spec["acceptance_per_prompt"].items()))
    print("profile (ms): " + ", ".join(f"{k}={v:.1f}" for k, v in bench.profile.items() if v is not None))


def sidecar_heads(run, heads, controller_on: str):
    """A copy of the routed heads with the controller on the Core ML sidecar, or None for mlx."""
    import dataclasses
    if controller_on == "mlx":
        return None
    from agp.ane.sidecar import serve_controller
    from agp.errors import AGPError
    if heads.controller is None:
        raise AGPError("--controller-on needs the stage-2 controller; run `agp run --stage controller`")
    return dataclasses.replace(heads, controller=serve_controller(run.path, heads.controller, controller_on))


def print_energy(bench) -> None:
    """The energy block: its unit on every header, "(proxy)" wherever the meter is the CPU-seconds proxy."""
    e = bench.energy
    if e.get("unavailable"):
        print(f"energy: unavailable ({e['unavailable']})")
        return
    proxy = " (proxy)" if e.get("is_proxy") else ""
    print(f"energy: {e.get('source')}, unit {e.get('unit')}{proxy}" + "".join(f"\n  {n}" for n in e.get("notes", [])))
    u = e.get("unit")
    f = lambda x, s="{:.4g}": "-" if x is None else s.format(x)  # noqa: E731
    print(f"{'mode':<26}{f'{u}/token{proxy}':>22}{f'{u}/accepted token{proxy}':>31}{f'{u}/decision{proxy}':>25}"
          f"{'x full':>8}")
    for r in bench.table:
        print(f"{r['mode']:<26}{f(r.get('energy_per_token')):>22}{f(r.get('energy_per_accepted_token')):>31}"
              f"{f(r.get('energy_per_decision')):>25}{f(r.get('energy_ratio_vs_full'), '{:.2f}'):>8}")
