"""TRL SFT entry point, for `accelerate launch` (multi-GPU, FSDP, DeepSpeed) or plain python.

    accelerate launch --config_file training/accelerate/multi_gpu.yaml training/sft.py \
        --run runs/beauty -s train.batch_size=64

Same as `genrec train`; the run directory must have been through `genrec prepare` and `build-ids`.
"""

from __future__ import annotations

import argparse
import logging

from genrec.config import apply_overrides
from genrec.run import RunDir
from genrec.training import train


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--run", required=True, help="run directory (runs/<name>)")
    parser.add_argument(
        "-s",
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="section.field=value config override (repeatable)",
    )
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    run = RunDir(args.run)
    cfg = apply_overrides(run.load_config(), args.overrides)
    run.save_config(cfg)
    print(train(run, cfg, resume=args.resume))


if __name__ == "__main__":
    main()
