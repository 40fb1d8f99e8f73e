"""`agp eval controller`: score a run's deployed controller on your own prompts."""
from __future__ import annotations

from agp import argtypes
from agp.errors import AGPError


def add_parser(sub):
    p = sub.add_parser("eval", help="score a run's trained parts on your own text (controller)",
                       description="Evaluate what a run trained on text it never saw.")
    tsub = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    c = tsub.add_parser("controller", help="label your prompts with the run's oracle and score its controller",
                        description="Labels the prompts of a JSONL file (one {\"text\": ...} object per line; "
                                    "\"id\" and \"source\" optional) with the run's own oracle settings (backbone "
                                    "and adapter, probe and decision layers, tuned-lens translators, label rule, "
                                    "positions per prompt), lets the run's deployed controller decide with its "
                                    "calibration, and prints the stage report's route table for your prompts "
                                    "beside the run's held-out split.")
    c.add_argument("--run", default=None, help="run directory (default runs/latest)")
    c.add_argument("--prompts", required=True, help="JSONL file of prompts ({\"text\": ...} per line)")
    c.add_argument("--limit", type=argtypes.positive_int(), default=None, help="use only the first N prompts")
    c.add_argument("--model", default=None, help="mlx-lm model directory (default: the run's)")
    c.add_argument("--json", default=None, metavar="FILE", help="also write the figures to FILE as JSON")
    c.set_defaults(func=main_controller)
    p.set_defaults(func=lambda a: (_ for _ in ()).throw(AGPError("choose an eval target: controller")))


def main_controller(args) -> int:
    from agp import io, runs
    from agp.train.controller_eval import evaluate, table

    run = runs.Run(args.run) if args.run else runs.latest_run()
    result = evaluate(run, args.prompts, model=args.model, limit=args.limit)
    print(f"agp eval controller: run {run.id}, {args.prompts} (sha256 {result['prompts_sha256'][:12]}), "
          f"decision layer {result['decision_layer']}, label rule {result['label_rule']}")
    print(table(result))
    if args.json:
        io.write_json(args.json, result)
        print(f"agp eval controller: figures written to {args.json}")
    return 0
