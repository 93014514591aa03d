"""The S-Adam study: S-Adam against AdamW and other baselines on non-smooth training problems
(quantization-aware training, small noisy batches, hinge loss) with offline data.
Run it with ``python -m sadam.study`` (``--quick`` for the demo)."""
