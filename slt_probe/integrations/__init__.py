"""slt_probe in the tools researchers train and watch with: PyTorch Lightning, the Hugging
Face Trainer, TensorBoard and Weights & Biases.

Each lives in its own module and imports its framework only when that module is imported
(``import slt_probe`` imports none of them); a missing framework is an ImportError naming
the extra to install:

- ``slt_probe.integrations.lightning.LLCCallback`` (``pip install "slt-probe[lightning]"``)
- ``slt_probe.integrations.hf.LLCCallback`` (``pip install "slt-probe[hf]"``)
- ``slt_probe.integrations.tensorboard.TensorBoardSink`` (``"slt-probe[tensorboard]"``)
- ``slt_probe.integrations.wandb.WandbSink`` (``"slt-probe[wandb]"``)
"""
