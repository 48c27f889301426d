"""e8: which parameters does the pipeline's slice student train? (idea 1: LayerNorms and FFN biases)

Prints every trainable tensor of the whitened 2x student of slice mlp5 (preset mlp) and block5 (preset block).
"""
import os, sys, tempfile
os.environ["HF_HUB_OFFLINE"] = "1"
sys.path.insert(0, "/work/main"); sys.path.insert(0, "/work/main/bench")
import torch
torch.set_num_threads(1)
from hf_minilm import minilm_dir
from distill.hf.models import load_hf_model
from distill.hf.pipeline import calibration_data
from distill.hf.presets import ATTENTION_PATTERNS, resolve, slice_specs
from distill.hf.capture import capture_features, load_slice_features
from distill.hf.train import tensorize_slice

teacher, tok = load_hf_model(minilm_dir())
calib, held = calibration_data("bert", tok, seq_len=32, num_samples=10**6, batch_size=16)
for preset in ("mlp", "block"):
    spec = slice_specs(teacher, preset, layers=[5])[0]
    with tempfile.TemporaryDirectory() as d:
        capture_features(teacher, [spec], calib[:2], d, progress=False)
        data = load_slice_features(d, spec.name)
    student, _ = tensorize_slice(resolve(teacher, spec), ratio=2, attention=False,
                                 attention_patterns=ATTENTION_PATTERNS["bert"], init="whitened", data=data)
    train = [(n, p.numel()) for n, p in student.named_parameters() if p.requires_grad]
    frozen = [(n, p.numel()) for n, p in student.named_parameters() if not p.requires_grad]
    print(preset, spec.name, "trainable", len(train), "tensors", sum(c for _, c in train), "params; frozen", frozen)
    for n, c in train:
        print("  ", n, c)
