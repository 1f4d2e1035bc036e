"""The probe inside the stacks researchers train with: real Lightning and Hugging Face
trainers, TensorBoard event files and W&B offline runs read back, the step under
gradient accumulation and AMP's skipped steps, and training left bit-identical."""
import glob
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import slt_probe
from slt_probe import SGLD
from slt_probe.run_log import WriterLock, read_rows

PROBE = dict(sampler=SGLD(lr=1e-4, localization=100.0), num_chains=2, num_draws=10,
             batch_size=16, verbose=False)


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return x, (x[:, 0] + x[:, 1] > 0).long()


def test_importing_slt_probe_imports_no_framework():
    code = ("import sys, slt_probe, slt_probe.integrations; "
            "bad = [m for m in ('lightning', 'transformers', 'tensorboard', 'wandb', 'ray') "
            "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize("module, extra", [("tensorboard", "tensorboard"), ("wandb", "wandb"),
                                           ("lightning", "lightning"), ("hf", "hf")])
def test_a_missing_framework_names_the_extra_to_install(module, extra):
    hide = {"tensorboard": "torch.utils.tensorboard", "wandb": "wandb",
            "lightning": "lightning.pytorch", "hf": "transformers"}[module]
    code = (f"import sys; sys.modules[{hide!r}] = None\n"
            f"import slt_probe.integrations.{module}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    assert f'pip install "slt-probe[{extra}]"' in done.stderr


def _train_loop(probe_kwargs=None, steps=30, tmp=None):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = _data()
    probe = None
    if probe_kwargs is not None:
        probe = slt_probe.LLCProbe(model, (x, y), log_dir=tmp, **probe_kwargs).attach(optimizer)
    for _ in range(steps):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    if probe is not None:
        probe.detach()
    return probe


def test_tensorboard_sink_writes_the_probes_rows_at_their_steps(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from slt_probe.integrations.tensorboard import TensorBoardSink

    with pytest.raises(TypeError, match="SummaryWriter"):
        TensorBoardSink(42)
    sink = TensorBoardSink(tmp_path / "tb")  # a folder, as one first tries
    probe = _train_loop({**PROBE, "every": 10, "on_estimate": sink,
                         "restrictions": {"hidden": ["0"], "readout": ["2"]}},
                        tmp=tmp_path / "run")
    sink.close()
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    rows = read_rows(tmp_path / "run" / "llc.csv")
    for tag, column in (("llc/mean", "llc_mean"), ("llc/std", "llc_std"),
                        ("llc/effective_params", "effective_params")):
        logged = [(e.step, e.value) for e in events.Scalars(tag)]
        assert [s for s, _ in logged] == [r["step"] for r in rows] == [0, 10, 20, 30]
        assert [v for _, v in logged] == pytest.approx([r[column] for r in rows], rel=1e-6)
    assert {"llc/healthy", "llc/excess_ratio"} <= set(events.Tags()["scalars"])
    assert len(probe.llc_rows()) == 4
    # one series per restriction
    for name in ("hidden", "readout"):
        logged = [(e.step, e.value) for e in events.Scalars(f"llc/{name}")]
        assert [v for _, v in logged] == pytest.approx([r[f"llc[{name}]"] for r in rows],
                                                       rel=1e-6)
        assert {f"llc/{name}_sem", f"llc/{name}_healthy"} <= set(events.Tags()["scalars"])


def test_a_probes_restrictions_are_the_estimates_of_one_restricted_run_at_those_weights(
        tmp_path):
    restrictions = {"hidden": ["0"], "readout": ["2"]}
    probe = _train_loop({**PROBE, "every": 15, "restrictions": restrictions},
                        tmp=tmp_path / "run")
    rows = read_rows(tmp_path / "run" / "llc.csv")
    assert [r["step"] for r in rows] == [0, 15, 30]
    model = probe.model  # trained to step 30: the last row's weights
    x, y = _data()
    alone = slt_probe.estimate_restricted(model, (x, y), restrictions, **PROBE)
    for name in restrictions:
        assert rows[-1][f"llc[{name}]"] == pytest.approx(alone[name].llc_mean, rel=1e-9)
        assert rows[-1][f"llc_sem[{name}]"] == pytest.approx(alone[name].llc_sem, rel=1e-9)
        assert rows[-1][f"healthy[{name}]"] == alone[name].diagnostics["healthy"]
    # the whole model's λ̂ is still the row's own, and the manifest names the restrictions
    assert rows[-1]["llc_mean"] == pytest.approx(
        slt_probe.estimate_llc(model, (x, y), **PROBE).llc_mean, rel=1e-9)
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["restrictions"] == [
        "hidden", "readout"]
    with pytest.raises(ValueError, match="restriction names"):
        slt_probe.LLCProbe(model, (x, y), restrictions={"a/b": ["0"]}, **PROBE)
    with pytest.raises(ValueError, match="restrict_to or restrictions"):
        slt_probe.LLCProbe(model, (x, y), restrictions={"a": ["0"]}, restrict_to=["2"], **PROBE)
    with pytest.raises(ValueError, match="leave executor=None"):
        slt_probe.llc_trajectory(model, [model.state_dict()], (x, y), executor="serial",
                                 restrictions=restrictions, **PROBE)


def _wandb_records(run_dir):
    """The records of an offline run's .wandb file (a LevelDB-style log of protobuf
    records: 32 KiB blocks of 7-byte-headed, possibly split records)."""
    from wandb.proto import wandb_internal_pb2

    data = open(glob.glob(os.path.join(run_dir, "*.wandb"))[0], "rb").read()
    assert data[:4] == b":W&B"
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7 or data[pos + 6] == 0:  # block trailer or zero padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            chunks.append(pending)
    records = []
    for raw in chunks:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        records.append(record)
    return records


def _wandb_history(run_dir, timeout=30.0):
    """History records of a finished offline run. ``run.finish()`` can return before the
    W&B service has flushed the run's file, so it is read until its exit record is there."""
    deadline = time.monotonic() + timeout
    while True:
        records = _wandb_records(run_dir)
        kinds = [record.WhichOneof("record_type") for record in records]
        if "exit" in kinds or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert "exit" in kinds, f"the run's file has no exit record after {timeout:g} s: {kinds}"
    return [{item.key or "/".join(item.nested_key): json.loads(item.value_json)
             for item in record.history.item}
            for record, kind in zip(records, kinds) if kind == "history"]


def test_wandb_sink_logs_offline_at_the_training_step(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    from slt_probe.integrations.wandb import WandbSink

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(project="slt-probe-test", dir=str(tmp_path))
    try:
        _train_loop({**PROBE, "every": 10, "on_estimate": WandbSink()}, tmp=tmp_path / "run")
    finally:
        run.finish()
    rows = read_rows(tmp_path / "run" / "llc.csv")
    history = [h for h in _wandb_history(run.dir.replace("/files", "")) if "llc/mean" in h]
    assert [int(h["llc/step"]) for h in history] == [r["step"] for r in rows]
    assert [h["llc/mean"] for h in history] == pytest.approx([r["llc_mean"] for r in rows])


def test_bare_loop_probe_counts_the_steps_amps_grad_scaler_really_took(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 4)
    x, y = _data()
    probe = slt_probe.LLCProbe(model, (x, y), every=1, **PROBE).attach(optimizer)
    taken = 0
    for step in range(6):
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y) * (float("inf") if step == 2 else 1.0)
        scaler.scale(loss).backward()
        before = [p.detach().clone() for p in model.parameters()]
        scaler.step(optimizer)  # skips optimizer.step() when the gradients are not finite
        scaler.update()
        taken += not all(torch.equal(b, p) for b, p in zip(before, model.parameters()))
    probe.detach()
    assert taken == 5
    assert [r["step"] for r in probe.llc_rows()] == list(range(taken + 1))


# -- Lightning ---------------------------------------------------------------------------

def _lightning_fit(tmp_path, callback=None, accumulate=1, steps=60, extra_callbacks=()):
    pl = pytest.importorskip("lightning.pytorch")

    class Classifier(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.2),
                                           torch.nn.Tanh(), torch.nn.Linear(16, 2))

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.cross_entropy(self(x), y)

        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=1e-2)

    pl.seed_everything(0, verbose=False)
    module = Classifier()
    x, y = _data(256)
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    trainer = pl.Trainer(max_steps=steps, accumulate_grad_batches=accumulate,
                         callbacks=([callback] if callback else []) + list(extra_callbacks),
                         logger=pl.loggers.CSVLogger(
                             tmp_path / "logs"), enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False,
                         accelerator="cpu", devices=1)
    trainer.fit(module, loader)
    return module, trainer


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_callback_estimates_at_optimizer_steps_and_leaves_training_identical(
        tmp_path, accumulate):
    pytest.importorskip("lightning.pytorch")
    from slt_probe.integrations.lightning import LLCCallback

    x, y = _data(256)
    callback = LLCCallback((x, y), every=20, log_dir=tmp_path / "llc",
                           restrictions={"first": ["net.0"]}, **PROBE)
    with_probe, trainer = _lightning_fit(tmp_path, callback, accumulate)
    without, _ = _lightning_fit(tmp_path / "plain", None, accumulate)
    for a, b in zip(with_probe.parameters(), without.parameters()):
        assert torch.equal(a, b)
    assert trainer.global_step == 60
    rows = read_rows(tmp_path / "llc" / "llc.csv")
    assert [r["step"] for r in rows] == [0, 20, 40, 60]
    logged = read_rows(glob.glob(str(tmp_path / "logs" / "**" / "metrics.csv"),
                                 recursive=True)[0])
    logged = [r for r in logged if r.get("llc/mean") is not None]
    assert [r["step"] for r in logged] == [0, 20, 40, 60]
    assert [r["llc/mean"] for r in logged] == pytest.approx([r["llc_mean"] for r in rows])
    assert [r["llc/first"] for r in logged] == pytest.approx([r["llc[first]"] for r in rows])


def test_lightning_callback_releases_its_log_folder_when_the_fit_raises(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    from slt_probe.integrations.lightning import LLCCallback

    class Boom(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step == 25:
                raise RuntimeError("boom")

    callback = LLCCallback(_data(256), every=10, log_dir=tmp_path / "llc", **PROBE)
    with pytest.raises(RuntimeError, match="boom"):
        _lightning_fit(tmp_path, callback, extra_callbacks=[Boom()])
    assert [r["step"] for r in read_rows(tmp_path / "llc" / "llc.csv")] == [0, 10, 20]
    # the folder is free: a new writer may resume it at once (not at garbage collection)
    WriterLock(tmp_path / "llc").release()


def test_lightning_callback_under_two_process_ddp_estimates_on_rank_zero_only(tmp_path):
    pytest.importorskip("lightning.pytorch")
    script = Path(__file__).parent / "scripts" / "lightning_ddp.py"
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "llc")],
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "rank 0: probe built, 3 rows" in done.stdout
    assert "rank 1: probe not built, 0 rows" in done.stdout
    rows = read_rows(tmp_path / "llc" / "llc.csv")
    assert [r["step"] for r in rows] == [0, 10, 20]
    assert all(r["llc_mean"] is not None for r in rows)


# -- Hugging Face ------------------------------------------------------------------------

class _Examples(torch.utils.data.Dataset):
    def __init__(self, n=96, length=6, vocab=20, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)
        self.labels = (self.ids[:, 0] > vocab // 2).long()

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]),
                "labels": self.labels[i]}


def _hf_train(tmp_path, callback=None, accumulate=2, steps=12):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    config = transformers.BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32,
                                     max_position_embeddings=16, num_labels=2)
    transformers.set_seed(0)
    model = transformers.BertForSequenceClassification(config)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=steps, per_device_train_batch_size=8,
        gradient_accumulation_steps=accumulate, learning_rate=1e-3, report_to=[],
        save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Examples(),
                                   callbacks=[callback] if callback else [])
    trainer.train()
    return model, trainer


def test_hf_callback_estimates_at_optimizer_steps_under_accumulation_and_leaves_training_identical(
        tmp_path):
    pytest.importorskip("transformers")
    from slt_probe.integrations.hf import LLCCallback

    callback = LLCCallback(_Examples(), every=4, log_dir=tmp_path / "llc", **PROBE)
    with_probe, trainer = _hf_train(tmp_path, callback)
    without, _ = _hf_train(tmp_path / "plain", None)
    for a, b in zip(with_probe.parameters(), without.parameters()):
        assert torch.equal(a, b)
    assert trainer.state.global_step == 12  # optimizer steps: 24 micro-batches
    rows = read_rows(tmp_path / "llc" / "llc.csv")
    assert [r["step"] for r in rows] == [0, 4, 8, 12]
    assert all(r["llc_mean"] is not None for r in rows)
    logged = [h for h in trainer.state.log_history if "llc/mean" in h]
    assert [h["step"] for h in logged] == [0, 4, 8, 12]
    assert [h["llc/mean"] for h in logged] == pytest.approx([r["llc_mean"] for r in rows])


class _Sentences(torch.utils.data.Dataset):
    """Token sequences of a counting language (each token is the previous one + a step, mod
    the vocabulary), with causal-LM labels: the input ids themselves."""

    def __init__(self, n=64, length=12, vocab=17, seed=0):
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, vocab, (n, 1), generator=g)
        step = torch.randint(1, 4, (n, 1), generator=g)
        self.ids = (start + step * torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_callback_on_a_gpt2_language_model_uses_fused_attention_and_the_next_token_loss(
        tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    from slt_probe.integrations.hf import LLCCallback

    def train(callback):
        transformers.set_seed(0)
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=17,
                                         n_positions=16, attn_implementation="sdpa")
        model = transformers.GPT2LMHeadModel(config)
        args = transformers.TrainingArguments(
            output_dir=str(tmp_path / "hf"), max_steps=40, per_device_train_batch_size=16,
            learning_rate=3e-3, report_to=[], save_strategy="no", logging_strategy="no",
            disable_tqdm=True, use_cpu=True, seed=0)
        trainer = transformers.Trainer(model=model, args=args, train_dataset=_Sentences(),
                                       callbacks=[callback] if callback else [])
        trainer.train()
        return model

    callback = LLCCallback(_Sentences(), every=20, log_dir=tmp_path / "llc",
                           loss_fn="next_token", **{**PROBE, "num_draws": 30})
    with_probe, without = train(callback), train(None)
    for a, b in zip(with_probe.parameters(), without.parameters()):
        assert torch.equal(a, b)
    rows = read_rows(tmp_path / "llc" / "llc.csv")
    assert [r["step"] for r in rows] == [0, 20, 40]
    # the counting language is learnt: the loss falls well below the uniform log 17
    assert rows[-1]["init_loss"] < 0.7 * math.log(17) < rows[0]["init_loss"]
    assert rows[-1]["llc_mean"] > rows[0]["llc_mean"]
    manifest = json.loads((tmp_path / "llc" / "manifest.json").read_text())
    assert manifest["request"]["loss_fn"] == "next_token"
    # GPT-2's sdpa attention ran fused over the chains, or as the loop where that was faster
    assert {r["compute_path"] for r in rows} <= {"vmap, fused attention", "loop over chains"}
    assert all(r["chains_at_once"] == 2 for r in rows)
    # the constant predictor of the next token is the reference: locality is measured once
    # the network beats it (at initialisation it does not, and the row says so)
    assert rows[0]["excess_ratio"] is None and rows[-1]["excess_ratio"] is not None


# the Hugging Face example (about 30 s: it builds and trains a model end to end) runs in
# the slow tier; the callback itself is tested above in the default run
@pytest.mark.parametrize("example, needs", [
    ("lightning_callback", "lightning"),
    pytest.param("hf_trainer", "transformers", marks=pytest.mark.slow),
    ("tensorboard_and_wandb", "wandb")])
def test_each_integration_example_runs_in_quick_mode(example, needs, tmp_path):
    pytest.importorskip(needs)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    done = subprocess.run([sys.executable, os.path.join(root, "examples", f"{example}.py"),
                           "--quick", "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "estimates" in done.stdout
    assert read_rows(tmp_path / "llc" / "llc.csv")[-1]["llc_mean"] is not None
