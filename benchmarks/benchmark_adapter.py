"""Stage-1 adapter training cost on the embedded Gemma 3 270M (asv), default config.

One optimizer step = mlx-lm's `default_loss` forward + backward through the LoRA blocks and the
262144-wide head, then an Adam update of the adapter weights: the body of mlx-lm's trainer step.
Batch and sequence length are the stage defaults (AdapterArgs), on real SFT rows of the default corpus.
"""
import agp  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx


class TrainStep:
    timeout = 600
    params = ["lora", "dora"]
    param_names = ["kind"]

    def setup_cache(self):
        from agp.backbone import embedded
        return str(embedded.model_dir())

    def setup(self, path, kind):
        import mlx.nn as nn
        import mlx.optimizers as optim
        import numpy as np
        from mlx_lm.tuner.trainer import default_loss, iterate_batches

        from agp.backbone.backbone import load
        from agp.data.default_corpus import CorpusArgs, default_records
        from agp.data.filters import apply_filters
        from agp.data.lanes import sft_row
        from agp.train import nll, tuner
        from agp.train.adapter import AdapterArgs

        cfg = AdapterArgs(kind=kind)
        self.bb = load.__wrapped__(path)
        recs, _ = apply_filters(default_records(CorpusArgs(code=16, docs=16)))
        rows = [r for r in map(sft_row, recs) if r][:16]
        data = nll.encode_rows(self.bb, rows, cfg.max_seq)
        mx.random.seed(0)
        tuner.attach(self.bb.model, cfg.kind, cfg.blocks, cfg.rank, cfg.scale, cfg.dropout)
        np.random.seed(0)
        self.batch = next(iterate_batches(data, cfg.batch_size, cfg.max_seq, seed=0))
        self.opt = optim.Adam(learning_rate=cfg.learning_rate)
        self.vg = nn.value_and_grad(self.bb.model, default_loss)
        self.step()  # warm-up: allocation and optimizer state

    def step(self):
        (loss, ntoks), grads = self.vg(self.bb.model, *self.batch)
        self.opt.update(self.bb.model, grads)
        mx.eval(loss, self.bb.model.trainable_parameters(), self.opt.state)
        return loss

    def time_train_step(self, path, kind):
        self.step()

    def peakmem_train_step(self, path, kind):
        self.step()

    def track_mlx_peak_memory_gb(self, path, kind):
        mx.reset_peak_memory()
        self.step()
        return mx.get_peak_memory() / 2**30

    track_mlx_peak_memory_gb.unit = "GiB"

    def track_tokens_per_step(self, path, kind):
        return int(self.batch[1][:, 1].sum().item())

    track_tokens_per_step.unit = "tokens"
