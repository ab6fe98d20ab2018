#!/usr/bin/env bash
# The analysis benchmarks on a GPU with BERT-base-sized random-init models (12 layers, d_model 768,
# 12 heads), one command: absolute times and ratios against baselines timed in the same run.
#
#   bash benchmarks/gpu.sh                      # on a machine with CUDA
#
# 1. Head x position activation patching (benchmarks/patching.py) against TransformerLens's
#    get_act_patch_attn_head_out_by_pos: the native encoder of BERT-base size ("base" preset) with
#    the fast path and with stacked patched copies in the batch dimension, and the HF BERT backbone
#    ("bert-base" preset, post-LN) with stacked copies.
# 2. Circuit discovery (benchmarks/circuits.py) on a 12-layer, d_model 768, 12-head attention-only
#    native model: EAP-IG (25 steps per forward vs one) and exact edge patching (batched edges vs
#    one edge per forward). The EAP and ACDC rows' one-edge baselines take hours at this size.
#
# Environment: DEVICE (cuda), N pairs (256), THREADS (4), PYTHON (python); NATIVE / BERT / SPEC
# replace the models, e.g. for a dry run on a CPU:
#   DEVICE=cpu N=4 NATIVE=student BERT=bert-student SPEC='{"n_layers": 2}' bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
DEVICE=${DEVICE:-cuda}
N=${N:-256}
THREADS=${THREADS:-4}
NATIVE=${NATIVE:-base}
BERT=${BERT:-bert-base}
SPEC=${SPEC:-'{"n_layers": 12, "d_model": 768, "n_heads": 12}'}
"$PYTHON" -c "import torch, sys; sys.exit(0 if '$DEVICE' != 'cuda' or torch.cuda.is_available() else
    'benchmarks/gpu.sh: no CUDA device here (torch ' + torch.__version__ + '); DEVICE=cpu for a dry run')"
"$PYTHON" -c "import torch; print('device:', torch.cuda.get_device_name() if '$DEVICE' == 'cuda' else 'cpu', '| torch', torch.__version__)"
echo "== patching: native encoder '$NATIVE', fast path and stacked copies"
"$PYTHON" benchmarks/patching.py --device "$DEVICE" --models "$NATIVE" --methods fast,stacked --n "$N" --threads "$THREADS"
echo "== patching: HF BERT '$BERT', stacked copies"
"$PYTHON" benchmarks/patching.py --device "$DEVICE" --models "$BERT" --methods stacked --n "$N" --threads "$THREADS"
echo "== circuits: $SPEC"
"$PYTHON" benchmarks/circuits.py --device "$DEVICE" --spec "$SPEC" --rows eap-ig,exact
