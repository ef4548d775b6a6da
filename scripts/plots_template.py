"""Write the offline page template of `dvc plots show` (.dvc/plots_offline.html; see nucleiseg.plots_template).

Run after upgrading vl-convert-python or DVC:  .venv/bin/python scripts/plots_template.py
"""

from __future__ import annotations

import argparse

from nucleiseg.plots_template import write_template

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dvc_dir", nargs="?", default=".dvc", help="the repository's .dvc folder (default .dvc)")
    print(f"-> {write_template(parser.parse_args().dvc_dir)}")
