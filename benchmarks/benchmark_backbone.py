"""Backbone speed and faithfulness on the embedded Gemma 3 270M (asv).

time_/peakmem_ pairs for prefill, decode and capture; track_ for the lens KL at the onset layer
and segmented-vs-mlx-lm parity, so faithfulness has history like speed.
"""
import agp  # noqa: F401  (fast BLAS before mlx)
import mlx.core as mx

PROMPT = ("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n    a, b = 0, 1\n"
          "    for _ in range(n):\n        a, b = b, a + b\n    return a\n") * 2


def _bb():
    from agp.backbone import load
    return load()


class Backbone:
    timeout = 300

    def setup_cache(self):
        from agp.backbone import embedded
        return str(embedded.model_dir())  # converts once per machine

    def setup(self, _):
        self.bb = _bb()
        self.tok = mx.array([self.bb.encode(PROMPT)])
        self.layers = list(range(1, self.bb.n_layers + 1))

    def time_prefill_segmented(self, _):
        mx.eval(self.bb.forward(self.tok))

    def peakmem_prefill_segmented(self, _):
        mx.eval(self.bb.forward(self.tok))

    def time_prefill_mlx_lm(self, _):
        mx.eval(self.bb.model(self.tok))

    def time_capture_all_layers(self, _):
        mx.eval(self.bb.capture(self.tok, self.layers))

    def peakmem_capture_all_layers(self, _):
        mx.eval(self.bb.capture(self.tok, self.layers))

    def time_decode_16_tokens(self, _):
        cache = self.bb.make_cache()
        logits = self.bb.forward(self.tok, cache)
        for _ in range(16):
            nxt = mx.argmax(logits[0, -1]).reshape(1, 1)
            logits = self.bb.forward(nxt, cache)
        mx.eval(logits)

    def track_parity_max_abs_diff(self, _):
        return mx.abs(self.bb.forward(self.tok) - self.bb.model(self.tok)).max().item()

    track_parity_max_abs_diff.unit = "logit"

class LensKL:
    """Mean KL(final || logit lens) at the candidate split layers stage 0 chose on the 270M
    (onset 13, exit 17; runs/<id>/manifest.json -> baseline.split_map)."""
    params = [13, 17]
    param_names = ["layer"]
    timeout = 300

    def setup(self, layer):
        self.bb = _bb()
        self.tok = mx.array([self.bb.encode(PROMPT)])

    def track_lens_kl(self, layer):
        from agp.backbone.lens import lens_stats
        logits, hidden = self.bb.capture(self.tok, [layer])
        return float(lens_stats(self.bb, hidden, logits)["kl"].mean())

    track_lens_kl.unit = "nats"


class Load:
    timeout = 300

    def setup_cache(self):
        from agp.backbone import embedded
        return str(embedded.model_dir())

    def peakmem_load_embedded(self, path):
        import mlx_lm
        mlx_lm.load(path)

    def time_load_embedded(self, path):
        import mlx_lm
        mlx_lm.load(path)
