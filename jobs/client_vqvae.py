"""NVFlare client entry point of the ``vqvae`` job: runs :func:`fl_app.fl.client.main` with its task.

A flat file (not inside the fl_app package) so that NVFlare copies it into the job's custom folder without
shadowing the installed ``fl_app`` package at the site.
"""

import sys

from fl_app.fl.client import main

if __name__ == "__main__":
    sys.exit(main("vqvae"))
