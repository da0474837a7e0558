"""Compile the train step of a config on its mesh and list the collectives XLA inserted.

    python tools/collectives.py tiny mesh.data=4 mesh.model=2 --cpu-devices 8 [--show]
"""

import argparse
import sys

from lm.devices import simulate_cpu_devices


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("config")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--cpu-devices", type=int)
    p.add_argument("--show", action="store_true", help="print each collective's HLO line")
    args = p.parse_intermixed_args()
    if args.cpu_devices:
        simulate_cpu_devices(args.cpu_devices)
    from lm import config, sharding, train

    cfg = config.load(args.config, args.overrides)
    program = train.compile_program(cfg)
    hlo = program.step.as_text()
    counts = sharding.collectives(hlo)
    print(f"mesh {dict(program.layout.mesh.shape)}  fsdp={cfg.mesh.fsdp}")
    for op in sharding.COLLECTIVES:
        print(f"  {op:<20} {counts.get(op, 0)}")
    if args.show:
        for line in hlo.splitlines():
            if any(f" {op}" in line for op in counts):
                print(line.strip()[:200])


if __name__ == "__main__":
    sys.exit(main())
