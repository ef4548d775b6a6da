#!/usr/bin/env bash
# Check that a logged nucleiseg model is portable: it loads and predicts in a fresh virtual environment that holds
# only the requirements MLflow recorded with it (the model's requirements.txt), with no nucleiseg installed and
# outside this checkout, and gives the label that nucleiseg's own Predictor gives here.
#
#   scripts/check_portable_model.sh [MODEL] [VENV]
#
# MODEL: an MLflow model URI (default models:/nucleiseg@champion, from MLFLOW_TRACKING_URI or the project store
# sqlite:///mlruns/mlflow.db) or a saved model folder. VENV: where to create the environment (default: a temporary
# folder, removed at the end; an existing one is reused, which skips the install). Creating and installing the
# environment took 205 s and 6.4 GB on the project's 2-core machine (torch's CUDA build with its NVIDIA libraries,
# from pip's configured indexes), which is why this is a script and not a test; tests/test_mlflow_model.py checks
# the model in an isolated interpreter of this environment. Prints the timings; exits non-zero when anything
# differs.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
model_ref="${1:-models:/nucleiseg@champion}"
work=$(mktemp -d)
venv="${2:-$work/venv}"
trap 'rm -rf "$work"' EXIT
export MLFLOW_TRACKING_URI="${MLFLOW_TRACKING_URI:-sqlite:///$repo/mlruns/mlflow.db}"

# 1. The model as a folder, and the reference: nucleiseg's Predictor (this checkout) on a synthetic 200 x 170 tile.
"$repo/.venv/bin/python" - "$model_ref" "$work" <<'EOF'
import sys
from pathlib import Path

import numpy as np

from nucleiseg.infer import load_predictor
from nucleiseg.synth import synth_tile

ref, work = sys.argv[1], Path(sys.argv[2])
folder = Path(ref)
if not (folder / "MLmodel").is_file():
    import mlflow.artifacts

    folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(work / "download")))
(work / "model_path").write_text(str(folder.resolve()))
image = synth_tile(3, 256)[0][:200, :170]
np.save(work / "image.npy", image)
np.save(work / "expected.npy", load_predictor(str(folder), device="cpu").label(image))
print(f"model: {ref} ({folder})")
EOF
model=$(cat "$work/model_path")
echo "requirements recorded with the model:"
sed 's/^/  /' "$model/requirements.txt"
echo

# 2. A fresh environment with only those requirements (pip's configured index and cache, as any install here).
start=$(date +%s)
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q -r "$model/requirements.txt"
fi
installed=$(($(date +%s) - start))
echo "fresh venv created and installed in ${installed} s ($(du -sh "$venv" | cut -f1))"

# 3. Load and predict there: isolated mode (no user site, no PYTHONPATH), an empty working directory, a clean env.
mkdir "$work/cwd"
cd "$work/cwd"
env -i PATH=/usr/bin:/bin HOME="$HOME" OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$venv/bin/python" -I - "$work" "$model" <<'EOF'
import importlib.util
import sys
import time
from pathlib import Path

import numpy as np

work, folder = Path(sys.argv[1]), sys.argv[2]
assert importlib.util.find_spec("nucleiseg") is None, "nucleiseg is installed in the fresh environment"
import mlflow.pyfunc

start = time.perf_counter()
model = mlflow.pyfunc.load_model(folder)
loaded = time.perf_counter() - start
label = model.predict(np.load(work / "image.npy"))
expected = np.load(work / "expected.npy")
import nucleiseg

print(f"loaded in {loaded:.1f} s with nucleiseg from {nucleiseg.__file__}")
print(f"label {label.dtype} {label.shape}, {len(np.unique(label)) - 1} nuclei")
if not np.array_equal(label, expected):
    sys.exit(f"the label differs from nucleiseg's Predictor in {np.count_nonzero(label != expected)} pixels")
print("portable: the label equals nucleiseg's Predictor's")
EOF
