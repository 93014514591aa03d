"""SAdam as a drop-in optimizer of the Hugging Face Trainer: a tiny GPT-2 built from a config
(nothing downloaded) trains, checkpoints, and a run resumed from the checkpoint ends where the
uninterrupted run ends."""
import pytest
import torch

import sadam
from spec_tolerance import assert_params_close, assert_rho_close

transformers = pytest.importorskip("transformers", reason="transformers is not installed "
                                   "(make venv installs it)")
pytest.importorskip("accelerate", reason="the Trainer needs accelerate (make venv installs it)")

STEPS, SAVE_EVERY = 6, 3


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=48, length=16, vocab=64):
        g = torch.Generator().manual_seed(0)
        base = torch.randint(0, vocab, (n, 1), generator=g)
        # a learnable pattern: each sequence counts up from a random start
        self.ids = (base + torch.arange(length)) % vocab

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer(output_dir, max_steps):
    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2,
                                     n_head=2, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(config)
    opt = sadam.SAdam(model.parameters(), lr=3e-3, damping=1.0, weight_decay=0.01,
                      backend="torch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    args = transformers.TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=8,
        save_steps=SAVE_EVERY, save_strategy="steps", logging_steps=1, report_to=[],
        use_cpu=True, seed=0, data_seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Tokens(),
                                   optimizers=(opt, sched))
    return trainer, model, opt


def test_trainer_trains_checkpoints_and_resumes(tmp_path):
    trainer, model, opt = _trainer(tmp_path / "full", STEPS)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == STEPS and losses[-1] < losses[0]
    assert float(opt.state[next(model.parameters())]["step"]) == STEPS
    assert 0 < float(opt.lgi()[0]) <= 1

    checkpoint = tmp_path / "full" / f"checkpoint-{SAVE_EVERY}"
    assert (checkpoint / "optimizer.pt").exists()
    resumed, resumed_model, resumed_opt = _trainer(tmp_path / "resumed", STEPS)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert float(resumed_opt.state[next(resumed_model.parameters())]["step"]) == STEPS
    for p, q in zip(model.parameters(), resumed_model.parameters()):
        assert_params_close(q, p)
    assert_rho_close(resumed_opt.lgi()[0], opt.lgi()[0])
