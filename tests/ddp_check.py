"""Helper run by tests/test_train_eval.py in a subprocess: train the tiny model with Lightning on
N CPU processes (DDP, gloo) on a fixed global batch; every rank saves its trainable tensors before
training (`initial{rank}.pt`) and after every optimiser step (`rank{rank}_step{k}.pt`).

    python tests/ddp_check.py CONFIG_YAML OUT_DIR N_PROCESSES STEPS

The random draws (noise, latent noise, timesteps, CFG) are pinned per sample, so one process on
the global batch and N processes on its shards must take the same optimiser step.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GLOBAL_BATCH = 4
CAPTIONS = ["a red circle", "a blue square on white", "two green lines", "an orange sun"]


class FixedSamples(torch.utils.data.Dataset):
    """Four CC3M-like samples (same supervised token count each), with pinned random draws."""

    def __init__(self, model):
        from conftest import VOKEN_TARGET, fixed_draws, make_batch

        cfg = model.cfg
        samples = [{"source": c, "target": VOKEN_TARGET, "caption": c} for c in CAPTIONS]
        self.batch = make_batch(model.model.llama_tokenizer, samples, cfg.image_size, cfg.sd_image_size, seed=1)
        latent = (4, model.unet.config.sample_size, model.unet.config.sample_size)
        self.batch.update(fixed_draws(len(samples), latent, seed=2))

    def __len__(self) -> int:
        return GLOBAL_BATCH

    def __getitem__(self, i: int) -> dict:
        return {k: (v[i] if k != "input_images" else v[:0]) for k, v in self.batch.items()}


def collate(items: list[dict]) -> dict:
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = values if key == "captions" else (torch.cat(values) if key == "input_images" else torch.stack(values))
    return out


def main() -> None:
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Callback

    from configuration import load_config
    from model import MiniGPT5_Model

    config, out, n, steps = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    pl.seed_everything(0)
    # A large Adam epsilon makes the first update proportional to the gradient (not its sign), so
    # the comparison sees gradient differences instead of float noise in near-zero gradients.
    model = MiniGPT5_Model(load_config(config), stage=1, learning_rate=1e-2, warmup_steps=0, adam_epsilon=1.0)
    dataset = FixedSamples(model)
    sampler = torch.utils.data.SequentialSampler(dataset)
    loader = torch.utils.data.DataLoader(dataset, batch_size=GLOBAL_BATCH // n, sampler=sampler, collate_fn=collate)

    class SaveRankState(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            torch.save(pl_module.trainable_state_dict(),
                       out / f"rank{trainer.global_rank}_step{trainer.global_step}.pt")

        def on_train_start(self, trainer, pl_module):
            out.mkdir(parents=True, exist_ok=True)
            torch.save(pl_module.trainable_state_dict(), out / f"initial{trainer.global_rank}.pt")

    trainer = pl.Trainer(accelerator="cpu", devices=n, strategy="ddp" if n > 1 else "auto", max_steps=steps,
                         max_epochs=100, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         callbacks=[SaveRankState()], use_distributed_sampler=n > 1)
    trainer.fit(model, loader)


if __name__ == "__main__":
    main()
