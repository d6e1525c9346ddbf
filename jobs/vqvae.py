"""The ``vqvae`` federated job (NVFlare 2.9 recipe): ``python jobs/vqvae.py --env sim|poc|prod [options]``.

Same as ``synthbrain fl run vqvae ...``; ``python jobs/vqvae.py --help`` lists the options. The job itself is
built by :func:`fl_app.fl.run.build_recipe` (export a job folder with ``synthbrain fl export vqvae``).
Each site runs its client, ``python -m fl_app.fl.client vqvae`` (:mod:`fl_app.fl.client`, installed with the package).
"""

import argparse
import sys

from fl_app.fl.run import add_fl_parser

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="jobs/vqvae.py")
    add_fl_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["fl", "run", "vqvae", *sys.argv[1:]])
    sys.exit(args.func(args))
