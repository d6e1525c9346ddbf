"""The ``prior`` federated job (NVFlare 2.9 recipe): ``python jobs/prior.py --env sim|poc|prod [options]``.

Same as ``synthbrain fl run prior ...``; ``python jobs/prior.py --help`` lists the options. The job itself is
built by :func:`fl_app.fl.run.build_recipe` (export a job folder with ``synthbrain fl export prior``).
Each site runs its client, ``python -m fl_app.fl.client prior`` (:mod:`fl_app.fl.client`, installed with the package).
"""

import argparse
import sys

from fl_app.fl.run import add_fl_parser

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="jobs/prior.py")
    add_fl_parser(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["fl", "run", "prior", *sys.argv[1:]])
    sys.exit(args.func(args))
