"""TrainingState.create for an image model asked for channels_last weights, under whatever launcher runs
this (`accelerate launch --config_file configs/accelerate/zero2.yaml`: a DeepSpeed engine). Writes the
memory format the parameters ended in and whether one step's loss is finite."""

import json
import sys

import torch

from ssl_ebm import runtime
from ssl_ebm.config import load_config
from ssl_ebm.state import TrainingState

out = sys.argv[1]
cfg = load_config(None, ["model.x_shape=[1,28,28]", "model.encoder=conv", "model.conv_channels=4",
                         "model.generator=deconv", "model.gen_channels=4", "model.num_classes=3", "model.z_dim=4",
                         "model.prior_hidden=16", "sampler.bank_size=16", "data.batch_unlabelled=4",
                         "data.batch_labelled=2"])
acc = runtime.make_accelerator(cfg)
state = TrainingState.create(cfg, acc, memory_format=torch.channels_last)
conv = [p for p in state.net.parameters() if p.dim() == 4]
x = torch.randn(4, 1, 28, 28).to(memory_format=torch.channels_last)
terms = state.model(x, None, None, torch.randn(4, 4))
acc.backward(terms["loss"])
if acc.is_main_process:
    json.dump({"deepspeed": runtime.uses_deepspeed(acc), "conv_weights": len(conv),
               "contiguous": all(p.is_contiguous() for p in conv),
               "channels_last": all(p.is_contiguous(memory_format=torch.channels_last) for p in conv),
               "loss": float(terms["loss"])}, open(out, "w"))
acc.wait_for_everyone()
runtime.exit_process(0)
